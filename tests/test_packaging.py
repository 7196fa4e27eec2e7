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


def _origins(cwd: Path, *path_first: str) -> dict[str, Path]:
    """Where a fresh interpreter started in ``cwd`` finds the package and its sub-packages
    (``importlib.util.find_spec``; ``path_first`` goes to the front of ``sys.path``)."""
    code = (
        "import importlib.util, json, sys; sys.path[:0] = sys.argv[1:]; "
        "print(json.dumps({n: importlib.util.find_spec(n).origin for n in "
        "('prh_lightning', 'prh_lightning.callbacks', 'prh_lightning.recipes')}))"
    )
    done = subprocess.run([sys.executable, "-c", code, *path_first], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return {name: Path(origin) for name, origin in json.loads(done.stdout).items()}


def test_installed_package_finds_subpackages_outside_the_checkout(tmp_path):
    found = _origins(tmp_path)
    assert found["prh_lightning"] == ROOT / "prh_lightning" / "__init__.py"
    assert found["prh_lightning.callbacks"] == ROOT / "callbacks" / "__init__.py"
    assert found["prh_lightning.recipes"] == ROOT / "recipes" / "__init__.py"


def test_public_names_import():
    import prh_lightning
    import prh_lightning.callbacks as callbacks
    import prh_lightning.recipes  # noqa: F401

    assert callbacks.__all__, "prh_lightning.callbacks exports nothing"
    for name in callbacks.__all__:
        assert isinstance(getattr(callbacks, name), type), name
    assert prh_lightning.LayerTaps.__module__.startswith("prh_lightning.taps")
    assert prh_lightning.record_representations.__module__ == "prh_lightning.recording"
    assert prh_lightning.Representations.__module__ == "prh_lightning.representations"


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
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    found = _origins(tmp_path, str(target))
    package = target / "prh_lightning"
    assert found["prh_lightning"] == package / "__init__.py"
    assert found["prh_lightning.callbacks"] == package / "callbacks" / "__init__.py"
    assert found["prh_lightning.recipes"] == package / "recipes" / "__init__.py"
