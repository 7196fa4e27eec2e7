"""Packaging: the sub-packages callbacks/ and recipes/ import from the installed package and
ship inside a built wheel as prh_lightning.callbacks / prh_lightning.recipes; the wheel's
requirements are ranges with a small core; the core alone imports in a fresh virtual
environment that holds only the core requirements and what they require."""

from __future__ import annotations

import email
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from prh_lightning._optional import OPTIONAL

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["setup.py", "pyproject.toml", "README.md", "prh_lightning", "callbacks", "recipes"]

#: what `pip install prh-lightning` installs (the README states the same set)
CORE_REQUIREMENTS = {
    "torch>=2.1,<3",
    "torchmetrics>=1.4,<2",
    "lightning>=2.4,<3",
    "numpy>=1.26",
    "safetensors>=0.4",
    "tqdm>=4.66",
}
EXTRAS = {"hf", "vision", "plot", "stats", "faiss", "recipes", "all", "assets", "dev"}
CORE_IMPORTS = "import prh_lightning, prh_lightning.functional, prh_lightning.metrics, prh_lightning.callbacks"


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


def test_only_the_package_is_importable_not_the_checkout(tmp_path):
    code = ("import importlib.util, json; print(json.dumps([n for n in ('prh_lightning.tests', "
            "'prh_lightning.benchmarks', 'prh_lightning.scripts', 'prh_lightning.docs') "
            "if importlib.util.find_spec(n) is not None]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == []


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


def test_wheel_ships_the_type_marker(wheel):
    assert "prh_lightning/py.typed" in zipfile.ZipFile(wheel).namelist()


def _wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def test_wheel_requirements_are_ranges_with_a_small_core(wheel):
    meta = _wheel_metadata(wheel)
    requirements = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    core = {r for r in requirements if r.marker is None}
    assert {str(r) for r in core} == {str(Requirement(r)) for r in CORE_REQUIREMENTS}
    assert set(meta.get_all("Provides-Extra")) == EXTRAS
    for r in requirements:  # never replace a user's torch build
        if canonicalize_name(r.name) in {"torch", "torchvision"}:
            assert not any(spec.operator in ("==", "===") for spec in r.specifier), str(r)
            assert r.specifier, f"{r.name} needs a version range"


def test_every_optional_import_names_an_extra_that_installs_it():
    """prh_lightning._optional's table (used for the error messages) agrees with pyproject.toml."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def closure(extra: str) -> set[str]:
        names = set()
        for line in extras[extra]:
            r = Requirement(line)
            if canonicalize_name(r.name) == "prh-lightning":
                for inner in r.extras:
                    names |= closure(inner)
            else:
                names.add(canonicalize_name(r.name))
        return names

    for module, (distribution, extra) in OPTIONAL.items():
        assert canonicalize_name(distribution) in closure(extra), f"{module}: {distribution} is not in [{extra}]"
        assert canonicalize_name(distribution) in closure("all"), f"{distribution} is not in [all]"


def _installed_closure(requirements: list[Requirement]) -> list[metadata.Distribution]:
    """The installed distributions that ``requirements`` need, recursively (markers evaluated
    without extras): what `pip install` of those requirements would have put in a venv."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(requirements)
    while todo:
        r = todo.pop()
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        key = canonicalize_name(r.name)
        if key in found:
            continue
        dist = metadata.distribution(r.name)  # PackageNotFoundError: the test venv lacks a core dependency
        found[key] = dist
        todo += [Requirement(x) for x in dist.requires or []]
    return list(found.values())


@pytest.fixture(scope="module")
def core_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel (pip, no dependencies) beside links to the installed
    distributions of its core requirements only: no transformers, timm, torchvision, scipy,
    matplotlib, tensorboard, umap, scikit-learn, datasets."""
    venv = tmp_path_factory.mktemp("core") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    core = [Requirement(r) for r in _wheel_metadata(wheel).get_all("Requires-Dist")]
    linked = set()
    for dist in _installed_closure([r for r in core if r.marker is None]):
        here = Path(dist.locate_file(""))
        for file in dist.files or []:
            top = file.parts[0]
            if top != ".." and top not in linked and (here / top).exists():
                (site / top).symlink_to(here / top)
                linked.add(top)
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    done = subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", str(wheel)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, f"the core venv misses requirements:\n{check.stdout}{check.stderr}"
    return python


def _run_in(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_core_imports_with_only_the_core_requirements(core_venv, tmp_path):
    optional = sorted(OPTIONAL)
    code = (
        f"{CORE_IMPORTS}; import importlib.util, json, sys; "
        "from prh_lightning.representations import Representations; import torch; "
        "p = Representations({'a': torch.ones(3, 2)}).save('r.safetensors'); "
        "ok = Representations.load(p)['a'].sum().item() == 6; "
        f"print(json.dumps([ok, prh_lightning.__file__, [m for m in {optional!r} if importlib.util.find_spec(m)]]))"
    )
    done = _run_in(core_venv, code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ok, origin, installed_optional = json.loads(done.stdout.splitlines()[-1])
    assert ok and str(core_venv.parent.parent) in origin  # the wheel's copy, not the checkout
    assert installed_optional == []  # the venv really lacks the extras


def test_a_missing_extra_is_named_in_the_core_venv(core_venv, tmp_path):
    code = ("from prh_lightning._optional import require\n"
            "try:\n    require('scipy.stats', purpose='Kendall tau')\n"
            "except ModuleNotFoundError as err:\n    print(err)\n")
    done = _run_in(core_venv, code, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Kendall tau needs scipy.stats" in done.stdout and "pip install 'prh-lightning[stats]'" in done.stdout


FIT_WITH_MONITOR = """
import json, torch, lightning as L
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from prh_lightning.callbacks import AlignmentMonitor

class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.l1, self.act, self.fc = nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)
    def forward(self, x):
        return self.fc(self.act(self.l1(x)))
    def training_step(self, batch, i):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])
    def validation_step(self, batch, i):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))), batch_size=16)
trainer = L.Trainer(max_epochs=2, callbacks=[AlignmentMonitor()], enable_progress_bar=False, accelerator="cpu",
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir="run")
trainer.fit(Net(), data, data)
print(json.dumps([type(lg).__name__ for lg in trainer.loggers] + sorted(trainer.callback_metrics)))
"""


def test_the_monitor_runs_a_fit_with_only_the_core(core_venv, tmp_path):
    """The README's first use (a Trainer with the monitor) needs no extra: without tensorboard
    Lightning logs to CSV and the monitor still computes its scores."""
    done = _run_in(core_venv, FIT_WITH_MONITOR, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    names = json.loads(done.stdout.splitlines()[-1])
    assert names[0] == "CSVLogger"
    assert any(n.startswith("alignment/cka/") for n in names), names
