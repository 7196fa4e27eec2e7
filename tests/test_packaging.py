"""Packaging: the sub-packages callbacks/ and recipes/ import from the installed package and
ship inside a built wheel as prh_lightning.callbacks / prh_lightning.recipes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["setup.py", "pyproject.toml", "README.md", "prh_lightning", "callbacks", "recipes"]
PROBE = """
import importlib, json
out = {}
for name in ("prh_lightning.callbacks", "prh_lightning.recipes"):
    module = importlib.import_module(name)
    out[name] = module.__file__
    for attr in getattr(module, "__all__", []):
        getattr(module, attr)  # every advertised name resolves
import prh_lightning
out["LayerTaps"] = prh_lightning.LayerTaps.__module__
out["record_representations"] = prh_lightning.record_representations.__module__
print(json.dumps(out))
"""


def test_subpackages_import_from_the_installed_package(tmp_path):
    """A fresh interpreter started outside the checkout imports them through the installation."""
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["prh_lightning.callbacks"]) == ROOT / "callbacks" / "__init__.py"
    assert Path(found["prh_lightning.recipes"]) == ROOT / "recipes" / "__init__.py"
    assert found["LayerTaps"].startswith("prh_lightning.taps")
    assert found["record_representations"] == "prh_lightning.recording"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build a wheel from a clean copy of the sources (no network, no build isolation)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.exists():
            shutil.copy2(path, src / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(work / "dist"), str(src)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (built,) = (work / "dist").glob("prh_lightning-*.whl")
    return built


def test_wheel_contains_callbacks_and_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "prh_lightning/__init__.py",
        "prh_lightning/callbacks/__init__.py",
        "prh_lightning/recipes/__init__.py",
        "prh_lightning/taps/__init__.py",
        "prh_lightning/taps/layer_taps.py",
        "prh_lightning/recording.py",
        "prh_lightning/families.py",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    assert not any(n.startswith(("callbacks/", "recipes/", "tests/")) for n in names)


def test_unpacked_wheel_resolves_its_own_subpackages(wheel, tmp_path):
    """Where the sub-packages come from when the unpacked wheel is first on sys.path (found
    with importlib.util.find_spec, which does not run the heavy callback imports)."""
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = (
        "import importlib.util, json, sys; sys.path.insert(0, sys.argv[1]); "
        "print(json.dumps({n: importlib.util.find_spec(n).origin for n in "
        "('prh_lightning', 'prh_lightning.callbacks', 'prh_lightning.recipes')}))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    package = target / "prh_lightning"
    assert Path(found["prh_lightning"]) == package / "__init__.py"
    assert Path(found["prh_lightning.callbacks"]) == package / "callbacks" / "__init__.py"
    assert Path(found["prh_lightning.recipes"]) == package / "recipes" / "__init__.py"
