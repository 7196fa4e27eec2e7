"""The ``prh-lightning`` console command: ``prh-lightning <command> [options]``.

Each command is the ``main(argv) -> int`` of a recipe module; ``--help`` after a command
shows that recipe's options.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (module, function, one-line description)
    "fashion-mnist": ("prh_lightning.recipes.fashion_mnist", "main", "ResNet vs FashionCNN vs MiniLM on Fashion-MNIST (the main job)"),
    "platonic": ("prh_lightning.recipes.platonic", "main", "vision-language alignment as in the PRH paper, end to end"),
    "extract": ("prh_lightning.recipes.platonic", "extract_main", "extract per-layer features of a model set on paired data"),
    "measure": ("prh_lightning.recipes.platonic", "measure_main", "best-layer-pair alignment between saved feature files"),
    "ood": ("prh_lightning.recipes.ood", "main", "alignment on in-distribution vs out-of-distribution vs noise images"),
    "noise": ("prh_lightning.recipes.noise", "main", "alignment under progressive Gaussian noise"),
    "training-dynamics": ("prh_lightning.recipes.training_dynamics", "main", "alignment between runs along training"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: prh-lightning <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += ["", "Run 'prh-lightning <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"prh-lightning: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except SystemExit as stop:  # argparse inside a recipe: --help (0) or a usage error (2)
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)


if __name__ == "__main__":
    sys.exit(main())
