"""Output files: the user's umask, no half-written or orphaned files, clean I/O errors.

The writers are ``Representations.save`` (safetensors), ``write_json`` / ``Report.write`` /
``atomic_write_bytes`` (reporting), all through ``prh_lightning._files.atomic_write``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from prh_lightning._files import TEMP_SUFFIX, atomic_write, remove_stale_temporaries
from prh_lightning.reporting import Report, atomic_write_bytes, write_json
from prh_lightning.representations import Representations

WRITERS = {
    "representations": lambda p: Representations({"a": torch.randn(4, 3)}).save(p),
    "json": lambda p: write_json(p, {"x": 1}),
    "report": lambda p: Report("t").write(p),
    "bytes": lambda p: atomic_write_bytes(p, b"abc"),
}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_files_get_the_users_umask(tmp_path, writer, umask, expected):
    old = os.umask(umask)
    try:
        path = WRITERS[writer](tmp_path / "out" / "file")
        # an existing private file is replaced by one with the umask's mode too
        os.chmod(path, 0o600)
        path = WRITERS[writer](path)
    finally:
        os.umask(old)
    assert _mode(path) == expected, oct(_mode(path))
    assert [p.name for p in path.parent.iterdir()] == ["file"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_bytes(tmp_path / "r.bin", b"old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half of the ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"could not write .*r\.bin: No space left") as caught:
        atomic_write(path, half_then_fail)
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["r.bin"]


def test_an_interrupted_save_leaves_no_temporary(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("prh_lightning.representations.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Representations({"a": torch.zeros(2, 2)}).save(tmp_path / "r.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_safetensors_io_errors_become_oserror_naming_the_file(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("prh_lightning.representations.save_file", disk_full)
    with pytest.raises(OSError, match=r"could not write .*r\.safetensors: No space left on device") as caught:
        Representations({"a": torch.zeros(2, 2)}).save(tmp_path / "r.safetensors")
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", ["representations", "json"])
def test_a_real_write_error_is_a_clean_oserror(tmp_path, writer):
    """A file-size limit makes the kernel refuse the write (EFBIG) as a full disk would (ENOSPC)."""
    call = {
        "representations": "Representations({'a': torch.zeros(4096, 64)}).save(target)",
        "json": "write_json(target, {'x': list(range(100000))})",
    }[writer]
    done = _run(f"""
        import resource, signal, sys, torch
        from pathlib import Path
        from prh_lightning.representations import Representations
        from prh_lightning.reporting import write_json
        target = Path("out.file")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
        try:
            {call}
        except OSError as err:
            print(type(err).__name__, err.errno, err)
            sys.exit(3)
        """, tmp_path)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout.startswith(f"OSError {errno.EFBIG} ") and "could not write out.file: File too large" in done.stdout
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_killed_save_is_cleaned_up_by_the_next_save(tmp_path):
    """SIGKILL in the middle of a save (after safetensors wrote its own temporary file): the
    target is untouched, and the next save of the same target removes the debris."""
    target = tmp_path / "r.safetensors"
    Representations({"a": torch.zeros(2, 2)}).save(target)
    before = target.read_bytes()
    done = _run("""
        import os, signal, torch
        from safetensors.torch import save_file
        from prh_lightning._files import atomic_write

        def killed(tmp):
            save_file({"a": torch.ones(1000, 100)}, str(tmp))
            (tmp.parent / ".tmpXYZ123").write_bytes(b"x" * 1000)  # as safetensors leaves mid-write
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write("r.safetensors", killed)
        """, tmp_path)
    assert done.returncode == -9, done.stderr[-2000:]
    left = [p for p in tmp_path.iterdir() if p.name != "r.safetensors"]
    assert len(left) == 1 and left[0].name.startswith(".r.safetensors.") and left[0].name.endswith(TEMP_SUFFIX)
    assert target.read_bytes() == before

    Representations({"b": torch.ones(3, 2)}).save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]
    assert Representations.load(target).layers == ["b"]


def _fake_temporary(target: Path, pid: int, host: str | None = None) -> Path:
    folder = target.parent / f".{target.name}.{pid}@{host or socket.gethostname()}.abcd1234{TEMP_SUFFIX}"
    folder.mkdir()
    (folder / target.name).write_bytes(b"partial")
    return folder


def test_only_stale_temporaries_are_removed(tmp_path):
    target = tmp_path / "summary.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    dead = _fake_temporary(target, dead_pid)
    live = _fake_temporary(target, os.getppid())  # a save in progress in a live process: kept
    elsewhere = _fake_temporary(target, dead_pid, host="another-host")  # cannot tell: kept while recent
    old = _fake_temporary(target, 12345678, host="old-host")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    other_target = _fake_temporary(tmp_path / "report.md", dead_pid)  # another file's: not ours to touch

    assert sorted(remove_stale_temporaries(target)) == sorted([dead, old])
    assert live.is_dir() and elsewhere.is_dir() and other_target.is_dir()
    write_json(target, {"ok": True})
    assert json.loads(target.read_text()) == {"ok": True}
    assert live.is_dir()


def test_an_impossible_folder_is_a_clean_oserror(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(OSError, match=r"cannot write .*a_file/x\.json") as caught:
        write_json(tmp_path / "a_file" / "x.json", {})
    assert caught.value.errno in (errno.ENOTDIR, errno.EEXIST)
