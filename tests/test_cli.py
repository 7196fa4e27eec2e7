"""The `prh-lightning` console command dispatches to each recipe's entry point."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys

import pytest

from prh_lightning.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["fashion-mnst"]) == 2
    assert "unknown command 'fashion-mnst'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_an_entry_point_with_help(name, capsys):
    module, func, _ = COMMANDS[name]
    assert callable(getattr(importlib.import_module(module), func))
    assert main([name, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_console_script_is_installed():
    exe = shutil.which("prh-lightning", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe is not None, "the prh-lightning console script is not installed in this environment"
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "fashion-mnist" in done.stdout
