"""Command-line plumbing shared by every recipe: input errors, the writable-``--out`` check, data
paths (resolved here, in the CLI, never in library code), a fingerprint of the data used, torch
thread control, and progress lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

FLICKR_ENV = "PRH_FLICKR_DIR"
FLICKR_HELP = (
    "Get the Flickr8k image-caption sample (a folder of photos with a metadata.csv of file_name,text) and "
    f"set {FLICKR_ENV}=/path/to/flickr8k-1024, put it at ../shared/data/flickr8k-1024 next to this checkout, "
    "or pass --data minhuh/prh (the paper's pairs; needs internet)"
)


class RecipeInputError(ValueError):
    """Bad recipe input (missing data, unknown name, impossible setting); the message says what to do."""


# -- output folder ---------------------------------------------------------------------------------
def check_out_writable(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and prove it is writable (a probe file is written and removed),
    before any work; :class:`RecipeInputError` otherwise."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".prh-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RecipeInputError(f"--out {path} is not a writable folder ({err.strerror or err}); "
                               "pick another folder or fix its permissions") from None
    return path


def check_clip_quantile(q: float | None) -> None:
    """``--clip-quantile`` must be in ``(0, 1]`` (1 = no clipping)."""
    if q is not None and not 0.0 < q <= 1.0:
        raise RecipeInputError(f"--clip-quantile must be in (0, 1] (1 = no clipping), got {q}")


# -- data paths ------------------------------------------------------------------------------------
def _checkout_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` that holds a ``.git`` or ``pyproject.toml``."""
    for folder in (start, *start.parents):
        if (folder / ".git").exists() or (folder / "pyproject.toml").is_file():
            return folder
    return None


def resolve_flickr_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The Flickr8k folder: ``explicit``, else ``$PRH_FLICKR_DIR``, else
    ``../shared/data/flickr8k-1024`` beside the checkout holding the current directory; it must
    hold photos (``*.jpg``, directly or under ``images/``) or a ``metadata.csv``."""
    if explicit is not None:
        folder, origin = Path(explicit), "--data"
    elif os.environ.get(FLICKR_ENV):
        folder, origin = Path(os.environ[FLICKR_ENV]), f"${FLICKR_ENV}"
    else:
        root = _checkout_root(Path.cwd())
        if root is None:
            raise RecipeInputError(f"no Flickr8k data: {FLICKR_ENV} is not set and {Path.cwd()} is not inside a "
                                   f"checkout with ../shared beside it. {FLICKR_HELP}")
        folder, origin = root.parent / "shared" / "data" / "flickr8k-1024", "the default"
    if not folder.is_dir():
        raise RecipeInputError(f"{origin} points to {folder}, which is not a folder. {FLICKR_HELP}")
    has_data = (folder / "metadata.csv").is_file() or any(folder.glob("*.jpg")) or any((folder / "images").glob("*.jpg"))
    if not has_data:
        raise RecipeInputError(f"{origin} points to {folder}, which holds no photos (*.jpg) and no metadata.csv. "
                               f"{FLICKR_HELP}")
    return folder.resolve()


def fingerprint(files: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"path", "n_items", "sha256"}`` of the data used: a SHA-256 over each file's relative
    name and contents, in the given order (so the same images in the same order give the same sum)."""
    files = [Path(f) for f in files]
    base = Path(root) if root is not None else (files[0].parent if files else Path("."))
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(base) if f.is_relative_to(base) else f.name).encode() + b"\0")
        with open(f, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return {"path": str(base.resolve()), "n_items": len(files), "sha256": digest.hexdigest()}


# -- threads ---------------------------------------------------------------------------------------
def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_threads() -> int:
    """Torch threads that do not oversubscribe the machine: the cores not already busy
    (cores minus the 1-minute load average, at least 1)."""
    cores = available_cores()
    try:
        busy = int(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


@contextlib.contextmanager
def cpu_threads(spec: str | int = "auto"):
    """Set torch's CPU thread count for the block (``"auto"``: :func:`auto_threads`), then restore it."""
    import torch

    before = torch.get_num_threads()
    if spec == "auto":
        n = auto_threads()
    else:
        try:
            n = int(spec)
        except ValueError:
            raise RecipeInputError(f"--threads must be a positive number or auto, got {spec!r}") from None
        if n < 1:
            raise RecipeInputError(f"--threads must be a positive number or auto, got {spec!r}")
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


THREADS_HELP = ("torch CPU threads: a number, or auto = the cores not already busy (cores minus the load "
                "average, at least 1), so other jobs do not make spinning threads run ~5x slower (default: %(default)s)")


# -- running ---------------------------------------------------------------------------------------
_START = [0.0]


def log(message: str) -> None:
    """Print ``[  12.3 s] message`` to stderr (time since the first call)."""
    now = time.time()
    if not _START[0]:
        _START[0] = now
    print(f"[{now - _START[0]:7.1f} s] {message}", file=sys.stderr, flush=True)


def run_cli(prog: str, run: Callable[[Any], dict], args: Any, describe: Callable[[dict], str],
            errors: tuple[type[BaseException], ...] = ()) -> int:
    """``main`` of a recipe: check ``args.out`` is writable, run ``run(args)`` under ``--threads``;
    bad input (and ``errors``) prints one line on stderr and returns 2, a full disk returns 1 with a
    message; else prints ``describe(summary)`` and returns 0."""
    import errno

    from prh_lightning.models.pretrained import PretrainedUnavailable

    out = Path(args.out)
    created = not out.exists()
    try:
        check_out_writable(out)
        with cpu_threads(getattr(args, "threads", "auto")):
            summary = run(args)
    except (RecipeInputError, PretrainedUnavailable, *errors) as err:
        if created:  # leave no empty output folder behind after bad input
            with contextlib.suppress(OSError):
                out.rmdir()
        print(f"prh-lightning {prog}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"prh-lightning {prog}: no space left on the device holding {args.out}; free some space "
                  "or pick another --out", file=sys.stderr)
            return 1
        raise
    text = describe(summary)
    if text:
        print(text)
    return 0


def settings_dict(args: Any) -> dict[str, Any]:
    """``vars(args)`` with paths as strings (for summary.json)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
