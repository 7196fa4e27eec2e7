"""README.md is true: every Python block runs as written, and every shell command it shows works in
a fresh shell after the quick start (`make run`, `make test`): make targets exist, commands are
called as `.venv/bin/...` or after `source .venv/bin/activate`, and every option given to a
`prh-lightning` command is one that command accepts.

A Python block may opt out only with `<!-- not-run: why -->` on the line before its fence.
The blocks run with the documented assets: Fashion-MNIST found locally (never downloaded here)
and the Flickr8k sample in `$PRH_FLICKR_DIR` (default `../shared/data/flickr8k-1024`).
"""

from __future__ import annotations

import io
import os
import re
import shlex
import sys
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from prh_lightning.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED_FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1024"
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")
VENV_BIN = Path(sys.executable).parent
SCRIPT_COMMANDS = {"recipes/fashion_mnist.py": "fashion-mnist", "recipes/platonic.py": "platonic"}


@dataclass
class Block:
    language: str
    line: int  # 1-based line of the opening fence
    code: str
    not_run: str | None  # the reason given in a <!-- not-run: ... --> comment


def readme_blocks() -> list[Block]:
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        reason = NOT_RUN.search(before)
        blocks.append(Block(fence.group(1), i + 1, "\n".join(lines[i + 1:end]), reason and reason.group(1)))
        i = end + 1
    return blocks


PYTHON = [b for b in readme_blocks() if b.language == "python"]
SHELL = [b for b in readme_blocks() if b.language in ("bash", "sh", "shell", "console")]


def test_the_readme_has_blocks_and_every_opt_out_says_why():
    assert len(PYTHON) >= 4 and len(SHELL) >= 3
    assert all(b.language in ("python", "bash", "text") for b in readme_blocks()), "label every code block"
    for block in PYTHON:
        assert block.not_run is None or len(block.not_run) > 10, f"line {block.line}: say why it cannot run"


def is_ours(filename: str) -> bool:
    """A file of this checkout's code (not the README itself, not the virtual environment inside it)."""
    path = Path(filename).resolve()
    return path.is_relative_to(ROOT) and path != README and not path.is_relative_to(Path(sys.prefix).resolve())


@pytest.mark.parametrize("block", [b for b in PYTHON if b.not_run is None], ids=lambda b: f"README.md:{b.line}")
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks write files (feats.safetensors, runs/): keep them here
    if not os.environ.get("PRH_FLICKR_DIR"):
        if not SHARED_FLICKR.is_dir():
            pytest.fail(f"the README's blocks read the Flickr8k sample: set PRH_FLICKR_DIR (not at {SHARED_FLICKR})")
        monkeypatch.setenv("PRH_FLICKR_DIR", str(SHARED_FLICKR))
    monkeypatch.setenv("PRH_FASHION_MNIST_MIRROR", "http://127.0.0.1:9/")  # the tests never download
    code = compile(block.code, f"{README}:{block.line}", "exec")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(code, {"__name__": "__readme__"})  # a fresh namespace: each block stands alone
    # An example that makes this package warn (a metric recorded as NaN, a bad setting) is a wrong example.
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if is_ours(w.filename)]
    assert not ours, "\n".join(ours)


# -- shell commands ---------------------------------------------------------------------------------

def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


@cache
def options_of(command: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([command, "--help"]) == 0
    return out.getvalue()


def check_cli_call(words: list[str], where: str) -> None:
    """``prh-lightning <command> --opt ...`` (or ``python recipes/x.py ...``): command and options exist."""
    if words[0].endswith("python"):
        assert words[1] in SCRIPT_COMMANDS, f"{where}: {words[1]} is not a recipe script"
        assert (ROOT / words[1]).is_file(), f"{where}: {words[1]} does not exist"
        command, args = SCRIPT_COMMANDS[words[1]], words[2:]
    else:
        if words[1:2] in (["--help"], ["--version"]):
            return
        command, args = words[1], words[2:]
        assert command in COMMANDS, f"{where}: prh-lightning has no command {command!r}"
    for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", " ".join(args)):
        assert re.search(rf"(?<![\w-]){option}(?![\w-])", options_of(command)), (
            f"{where}: prh-lightning {command} has no option {option}")


def test_shell_blocks_work_in_a_fresh_shell_after_the_quick_start():
    targets = make_targets()
    for block in SHELL:
        active = False
        for offset, line in enumerate(block.code.splitlines(), start=1):
            where = f"README.md:{block.line + offset}"
            words = shlex.split(line, comments=True)
            if not words:
                continue
            command = words[0]
            if command == "make":
                missing = [w for w in words[1:] if "=" not in w and w not in targets]
                assert not missing, f"{where}: no make target {missing}"
            elif command == "source":
                assert words[1:] == [".venv/bin/activate"], where
                active = True
            elif command == "export":
                assert re.fullmatch(r"[A-Z_]+=.+", words[1]), where
            elif command.startswith(".venv/bin/"):
                assert (VENV_BIN / command.removeprefix(".venv/bin/")).is_file(), f"{where}: {command} is not installed"
                if command.endswith(("prh-lightning", "python")) and len(words) > 1 and words[1] != "-m":
                    check_cli_call([command.rsplit("/", 1)[1], *words[1:]], where)
            elif command in ("prh-lightning", "python", "pip", "tensorboard"):
                assert active, f"{where}: {command} is on PATH only after 'source .venv/bin/activate'"
                assert (VENV_BIN / command).is_file(), f"{where}: {command} is not in .venv/bin"
                if command in ("prh-lightning", "python"):
                    check_cli_call(words, where)
            else:
                pytest.fail(f"{where}: unexpected command {command!r} (not make, .venv/bin/..., or after activation)")


def test_inline_commands_exist_and_take_the_options_shown():
    text = README.read_text()
    spans = re.findall(r"`([^`\n]+)`", text)
    targets = make_targets()
    checked = 0
    for span in spans:
        words = [w for w in span.replace("[", " ").replace("]", " ").split() if not w.startswith("<")]
        if not words:
            continue
        if words[0] in ("prh-lightning", ".venv/bin/prh-lightning") and len(words) > 1:
            if "..." in span:  # an example with placeholders: check the options that are spelled out
                words = [w for w in words if "..." not in w]
            check_cli_call(["prh-lightning", *words[1:]], f"README.md: `{span}`")
            checked += 1
        elif words[0] == "make" and len(words) > 1:
            assert words[1] in targets, f"README.md: `{span}`: no make target {words[1]}"
        elif words[0].startswith(".venv/bin/"):
            assert (VENV_BIN / words[0].removeprefix(".venv/bin/")).is_file(), f"README.md: `{span}`"
    assert checked >= 5
