"""The `prh-lightning` console command: dispatch to each recipe, fast help that imports no torch,
--version, and quiet, clean failures (adverts and deprecations filtered, OSError in one line)."""

from __future__ import annotations

import errno
import importlib
import json
import logging
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

from prh_lightning import __version__
from prh_lightning.cli import COMMANDS, main

HEAVY = ("torch", "numpy", "lightning", "transformers", "scipy", "sklearn", "matplotlib", "umap")


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"prh-lightning {__version__}"


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["fashion-mnst"]) == 2
    assert "unknown command 'fashion-mnst'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_an_entry_point_with_help(name, capsys):
    module, func, _ = COMMANDS[name]
    assert callable(getattr(importlib.import_module(module), func))
    assert main([name, "--help"]) == 0  # torch is imported in this process: the help comes from the real module
    assert "usage:" in capsys.readouterr().out


def _fresh_help(names: list[str]) -> dict:
    """Each command's --help in one fresh interpreter: its text, status and the heavy modules loaded."""
    code = (
        "import contextlib, io, json, sys\n"
        "from prh_lightning.cli import main\n"
        "result = {}\n"
        f"for name in {names!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        status = main([name, '--help'])\n"
        f"    heavy = sorted(m for m in sys.modules if m.partition('.')[0] in {HEAVY!r})\n"
        "    result[name] = {'status': status, 'text': out.getvalue(), 'heavy': heavy}\n"
        "print(json.dumps(result))\n"
    )
    env = {"COLUMNS": "100", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_help_imports_no_torch_and_matches_the_real_help(monkeypatch, capsys):
    fresh = _fresh_help(sorted(COMMANDS))
    monkeypatch.setenv("COLUMNS", "100")
    for name, got in fresh.items():
        assert got["status"] == 0
        assert got["heavy"] == [], f"prh-lightning {name} --help imported {got['heavy'][:5]}"
        assert main([name, "--help"]) == 0  # the real module (torch is loaded here)
        assert got["text"] == capsys.readouterr().out, f"the fast help of {name} differs from its real help"


def test_fashion_mnist_help_from_the_console_script_imports_no_torch():
    exe = shutil.which("prh-lightning", path=str(Path(sys.executable).parent))
    assert exe is not None, "the prh-lightning console script is not installed in this environment"
    done = subprocess.run([sys.executable, "-X", "importtime", exe, "fashion-mnist", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--no-download" in done.stdout
    # -X importtime lists every import with its cumulative time; the stand-ins used while
    # rendering help cost microseconds, a real torch import about a second or more.
    times = {line.rsplit("|", 1)[1].strip(): int(line.split("|")[1]) for line in done.stderr.splitlines()
             if line.startswith("import time:") and line.count("|") == 2 and "cumulative" not in line}
    assert times.get("torch", 0) < 50_000, f"torch took {times.get('torch')} us to import"


def test_console_script_is_installed():
    exe = shutil.which("prh-lightning", path=str(Path(sys.executable).parent))
    assert exe is not None, "the prh-lightning console script is not installed in this environment"
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "fashion-mnist" in done.stdout


# -- a fake command to see how failures and noise come out --------------------------------------

@pytest.fixture
def fake(monkeypatch):
    module = types.ModuleType("prh_cli_fake_command")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(COMMANDS, "fake", (module.__name__, "main", "a command for tests"))
    return module


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device", "/runs/out/summary.json"),
    PermissionError(errno.EACCES, "Permission denied", "/runs/out"),
])
def test_an_os_error_is_one_clean_line_and_exit_1(fake, capsys, error):
    def fail(argv):
        raise error

    fake.main = fail
    assert main(["fake", "--out", "x"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines == [f"prh-lightning fake: error: [Errno {error.errno}] {error.strerror}: '{error.filename}'"]
    assert "Traceback" not in captured.err + captured.out


def test_prh_debug_shows_the_traceback(fake, monkeypatch):
    def fail(argv):
        raise OSError(errno.ENOSPC, "No space left on device")

    fake.main = fail
    monkeypatch.setenv("PRH_DEBUG", "1")
    with pytest.raises(OSError, match="No space left"):
        main(["fake"])


def test_lightning_adverts_and_deprecation_warnings_are_filtered_in_the_cli_only(fake, tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    def command(argv):
        Trainer(accelerator="cpu", logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False)
        warnings.warn("old_api() is deprecated", DeprecationWarning)
        warnings.warn("the default will change", FutureWarning)
        return 0

    fake.main = command
    source = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where Lightning's info lines start
    handler, level = Keep(), source.level
    source.addHandler(handler)
    source.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as direct:
            warnings.simplefilter("always")
            command([])  # the library called directly: nothing is filtered
        direct_lines, seen[:] = list(seen), []
        with warnings.catch_warnings(record=True) as via_cli:
            warnings.simplefilter("always")
            assert main(["fake"]) == 0
    finally:
        source.removeHandler(handler)
        source.setLevel(level)
    assert any("Tip" in line for line in direct_lines) and len(direct) == 2
    assert not any("Tip" in line or "litlogger" in line for line in seen)
    assert any("GPU available" in line for line in seen)  # only the adverts go, not Lightning's own facts
    assert [str(w.message) for w in via_cli] == []
