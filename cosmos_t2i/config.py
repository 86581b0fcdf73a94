"""`--config FILE.yaml` supplies any flag; command-line flags override it. Shared by the three scripts."""

import argparse
import sys
from pathlib import Path

import yaml


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse argv, taking defaults from `--config` YAML (keys are flag names without dashes)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            parser.error(f"--config {path}: no such file")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            parser.error(f"{path}: expected a mapping of flag names to values")
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - dests)
        if unknown:
            parser.error(f"{path}: unknown keys {unknown}; see --help for the accepted names")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def to_yaml(args: argparse.Namespace) -> str:
    """The resolved configuration as YAML (what --dryrun prints and each run saves)."""
    return yaml.safe_dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())},
                          sort_keys=False)
