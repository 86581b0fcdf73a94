"""`--config FILE.yaml` supplies any flag; command-line flags override it. Shared by the three scripts."""

import argparse
import copy
import sys
from pathlib import Path

import yaml


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse argv with `--config` YAML values in front of it (keys are flag names without dashes).

    YAML values go through the same parsing, types and choices as flags (a command-line flag given too wins, being
    later): `image_size: 64`, `lr: [0.001]` or `max_iter: 4.5` fail here, naming the file.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            parser.error(f"--config {path}: no such file")
        values = _read_yaml(parser, path)
        if not isinstance(values, dict):
            parser.error(f"{path}: expected a mapping of flag names to values")
        actions = {a.dest: a for a in parser._actions if a.option_strings}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            parser.error(f"{path}: unknown keys {unknown}; see --help for the accepted names")
        tokens = []
        for key, value in values.items():
            tokens += _as_flags(parser, actions[key], key, value, path)
        argv = tokens + argv
    return parser.parse_args(argv)


def _as_flags(parser, action, key, value, path) -> list[str]:
    """One YAML entry as the command-line tokens that say the same."""
    flag = next(o for o in action.option_strings if o.startswith("--"))
    if action.nargs == 0:  # store_true or --x/--no-x
        if not isinstance(value, bool):
            parser.error(f"{path}: {key}: expected true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else f"--no-{flag[2:]}"]
        return [flag] if value else []
    if value is None:
        return []
    if action.nargs in (None, "?"):
        if isinstance(value, (list, dict)):
            parser.error(f"{path}: {key}: expected one value, got {value!r}")
        tokens = [flag, str(value)]
    else:
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, (list, dict)) for v in items):
            parser.error(f"{path}: {key}: expected a list of values, got {value!r}")
        tokens = [flag, *map(str, items)]
    _check_value(parser, action, key, value, tokens, path)
    return tokens


def _read_yaml(parser, path):
    """The YAML file's contents; unreadable or malformed YAML is one error naming the file and the line."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"--config {path}: cannot be read ({e}).")
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        parser.error(f"{path}: not valid YAML{line} ({getattr(e, 'problem', None) or e}); fix the file's syntax.")


def _check_value(parser, action, key, value, tokens, path) -> None:
    """Parse one YAML entry with its flag alone, so a wrong type, count or choice names the file, key and expected
    type (argparse's own error would name only the flag, as if it came from the command line)."""
    alone = argparse.ArgumentParser(prog=parser.prog, add_help=False)
    alone._add_action(copy.copy(action))

    def error(message):
        parser.error(f"{path}: {key}: {value!r} is not {_expected(action)} ({message})")
    alone.error = error
    alone.parse_args(tokens)


_TYPE_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), None: ("a string", "strings")}


def _expected(action) -> str:
    """What a flag accepts, in words: 'an integer', 'a list of 2 integers', 'one of ab2, euler'."""
    one, many = _TYPE_WORDS.get(action.type, ("a valid value", "valid values"))
    if action.choices:
        one = "one of " + ", ".join(map(str, action.choices))
        many = f"values, each {one}"
    if isinstance(action.nargs, int):
        return f"a list of {action.nargs} {many}"
    if action.nargs in ("+", "*"):
        return f"{one} or a list of {many}"
    return one


def to_yaml(args: argparse.Namespace) -> str:
    """The resolved configuration as YAML (what --dryrun prints and each run saves)."""
    return yaml.safe_dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())},
                          sort_keys=False)
