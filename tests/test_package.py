"""The package as users meet it outside the scripts: examples/notebook.py samples a trained run through the package's
own API, and pyproject.toml installs cosmos_t2i alone with requirements.txt as its dependencies."""

import os

import numpy as np
import pytest
from conftest import ROOT, run_script, tiny_args
from PIL import Image

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def test_notebook_samples_a_trained_run(tiny_bundle, tmp_path):
    """A 1-iteration run (with EMA), then the notebook as a plain script: paths by flags and by environment."""
    run_script(*tiny_args(tiny_bundle, tmp_path, "--max_iter", "1", "--save_iter", "1"))
    out = tmp_path / "images" / "sample.png"
    env = {**os.environ, "COSMOS_OUT": str(out), "COSMOS_PROMPT": "a yellow square on a green background"}
    result = run_script("examples/notebook.py", "--dit_path", tmp_path / "posttraining" / "text2image" / "t",
                        "--vae_path", tiny_bundle / "models" / "vae",
                        "--text_encoder", tiny_bundle / "models" / "text_encoder", "--size", "32", "48", env=env)
    assert f"saved {out} (48x32)" in result.stdout, result.stdout
    image = Image.open(out)
    assert image.size == (48, 32) and image.mode == "RGB"
    pixels = np.asarray(image, dtype=float)
    assert pixels.std() > 2 and 5 < pixels.mean() < 250, (pixels.mean(), pixels.std())  # neither blank nor flat


def test_pyproject_installs_the_package_with_requirements_txt():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta, tools = config["project"], config["tool"]["setuptools"]
    assert config["build-system"]["build-backend"] == "setuptools.build_meta"
    assert meta["requires-python"] == ">=3.10" and (ROOT / meta["readme"]).is_file()
    assert "dependencies" in meta["dynamic"] and "dependencies" not in meta  # one list: requirements.txt
    assert tools["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
    # setuptools reads the file as PEP 508 lines: a pip option (-r, -c, --index-url) there would break the install
    from packaging.requirements import Requirement
    lines = [line.split(" #")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    names = {Requirement(line).name.lower() for line in lines if line and not line.startswith("#")}
    assert {"torch", "diffusers", "accelerate", "peft"} <= names, names
    find = tools["packages"]["find"]
    assert "cosmos_t2i" in find["include"]
    for folder in ("tests", "examples", "benchmarks"):
        assert folder in find.get("exclude", []) or not any(p.split(".")[0] == folder for p in find["include"])

    setuptools = pytest.importorskip("setuptools")
    found = setuptools.find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    assert found and set(found) == {p for p in found if p.split(".")[0] == "cosmos_t2i"}, found
    assert "cosmos_t2i" in found
    # every folder of the package with Python files is found (a subpackage left out would not be installed)
    with_code = {".".join(d.relative_to(ROOT).parts) for d in (ROOT / "cosmos_t2i").rglob("*")
                 if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))} | {"cosmos_t2i"}
    assert with_code <= set(found), with_code - set(found)
