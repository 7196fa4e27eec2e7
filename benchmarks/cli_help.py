"""Wall time and peak memory of ``prh-lightning <command> --help`` (goal: under 1 s), against the
same help printed after importing the recipe for real (what ``--help`` cost before it was fast),
each in a fresh interpreter, alternately, in one process.

    python benchmarks/cli_help.py [--command fashion-mnist] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

FAST = "import sys; from prh_lightning.cli import main; sys.exit(main({argv!r}))"
# The baseline: import the command's module as running it would, then print the same help.
SLOW = ("import importlib, sys; from prh_lightning.cli import COMMANDS, main; "
        "importlib.import_module(COMMANDS[{command!r}][0]); sys.exit(main({argv!r}))")


def timed(code: str) -> tuple[float, float]:
    """Seconds and peak resident MB of ``python -c code`` (children's maximum RSS so far)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or "usage:" not in done.stdout:
        raise SystemExit(f"help failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", default="fashion-mnist")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    help_argv = [args.command, "--help"]
    # RUSAGE_CHILDREN keeps the largest child so far: read the fast command's peak before any slow run.
    fast_mb = timed(FAST.format(argv=help_argv))[1]
    fast, slow = [], []
    for _ in range(args.repeats):
        fast.append(timed(FAST.format(argv=help_argv))[0])
        slow_s, slow_mb = timed(SLOW.format(command=args.command, argv=help_argv))
        slow.append(slow_s)
    fast_s, slow_s = statistics.median(fast), statistics.median(slow)
    print(f"prh-lightning {args.command} --help: {fast_s:.2f} s, {fast_mb:.0f} MB peak (median of {args.repeats}); "
          f"importing the recipe first: {slow_s:.2f} s, {slow_mb:.0f} MB; ratio {slow_s / fast_s:.1f}x; goal < 1 s: "
          f"{'met' if fast_s < 1 else 'NOT met'}")
    return fast_s


if __name__ == "__main__":
    main()
