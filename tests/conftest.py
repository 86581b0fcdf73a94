"""Shared fixtures: the tiny bundle is built once per test session in a temporary folder."""

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", category=DeprecationWarning)


def run_script(*args, check=True, env=None):
    """Run one of the repository's scripts in a subprocess, as a user would."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def tiny_args(bundle, out, *extra):
    """Command-line of a short training run on the tiny bundle (extra flags override, being later)."""
    return ["train_text2image.py", "--model_size", "tiny", "--dit_path", bundle / "models" / "transformer",
            "--vae_path", bundle / "models" / "vae", "--dataset_dir", bundle / "dataset", "--image_size", "64", "64",
            "--batch_size", "4", "--num_workers", "0", "--mixed_precision", "no", "--lr", "1e-3",
            "--scheduler", "constant", "--report_to", "none", "--output_root", out, "--name", "t",
            "--logging_iter", "1", "--hit_thres", "0", *map(str, extra)]


def anima_args(bundle, out, *extra):
    """A short training run on the tiny Anima bundle (extra flags override, being later)."""
    return ["train_text2image.py", "--family", "anima", "--model_size", "tiny", "--dit_path", bundle / "models",
            "--vae_path", bundle / "models" / "vae", "--dataset_dir", bundle / "dataset", "--image_size", "64", "64",
            "--batch_size", "4", "--num_workers", "0", "--mixed_precision", "no", "--lr", "1e-3",
            "--scheduler", "constant", "--report_to", "none", "--output_root", out, "--name", "a",
            "--logging_iter", "1", "--hit_thres", "0", *map(str, extra)]


def free_port() -> int:
    """A TCP port nobody listens on now, for a launcher's rendezvous (a fixed one can still be held by the previous
    test's processes while they wind down)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses_of(output: str) -> dict[int, float]:
    return {int(i): float(v) for i, v in re.findall(r"iter (\d+) loss ([-\d.eE+naif]+)", output)}


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """examples/tiny/make_assets.py output with embeddings pre-computed; do not modify (copy it first)."""
    out = tmp_path_factory.mktemp("tiny")
    run_script("examples/tiny/make_assets.py", "--output_dir", out)
    run_script("precompute_t5.py", "--dataset_path", out / "dataset", "--text_encoder", out / "models" / "text_encoder")
    return out


@pytest.fixture
def dataset_copy(tiny_bundle, tmp_path):
    """A private copy of the tiny dataset that a test may damage."""
    return Path(shutil.copytree(tiny_bundle / "dataset", tmp_path / "dataset"))


@pytest.fixture(scope="session")
def anima_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle for Anima: dataset/ (a copy of the tiny dataset with anima_text/ precomputed by
    `precompute_t5.py --family anima`) and models/ (make_assets.py's models/anima: an Anima diffusers folder). Do not
    modify (copy it first)."""
    out = tmp_path_factory.mktemp("anima")
    shutil.copytree(tiny_bundle / "dataset", out / "dataset")
    shutil.copytree(tiny_bundle / "models" / "anima", out / "models")
    run_script("precompute_t5.py", "--family", "anima", "--dataset_path", out / "dataset", "--text_encoder",
               out / "models")
    return out
