"""The ``prh-lightning`` console command: ``prh-lightning <command> [options]``.

Each command is the ``main(argv) -> int`` of a recipe module; ``--help`` after a command
shows that recipe's options, ``prh-lightning --version`` the package version.

Fast help. The recipes import torch and friends at the top of their modules (several seconds,
hundreds of MB), but their argument parsers need none of it. So ``prh-lightning <command>
--help`` runs the recipe's own ``main([... "--help"])`` while every third-party module is
replaced by an inert stand-in (:class:`_HelpOnlyImports`): the recipe's and this package's code
run for real, argparse prints the real help and exits before any stand-in is used for work.
If that fails, or a stand-in shows up in the text, the command is imported for real instead.
The modules imported this way are removed again afterwards, so nothing of it leaks into the
process. Recipes need no hook for this beyond parsing their arguments first in ``main``.

Quiet output. Only here, in the console command (never in library modules), Lightning's
"Tip" adverts and third-party deprecation warnings are filtered, and an ``OSError`` escaping a
command (disk full, permission denied) is one line on stderr with exit status 1 instead of a
traceback (``PRH_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import io
import logging
import os
import sys
import types
import warnings

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
HELP_FLAGS = {"-h", "--help"}
OWN_PACKAGES = {"prh_lightning"}  # imported for real while help is rendered; other non-stdlib modules are stand-ins


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: prh-lightning <command> [options]", "       prh-lightning --version", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += ["", "Run 'prh-lightning <command> --help' for a command's options."]
    return "\n".join(lines)


def _version() -> str:
    from prh_lightning import __version__

    return f"prh-lightning {__version__}"


# -- help without importing torch -------------------------------------------------------------

_STAND_IN = "<prh-lightning help stand-in"


class _StandIn:
    """Any attribute, call, item, base class or decorator of a third-party module, doing nothing."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _StandIn:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _StandIn(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs) -> _StandIn:
        return _StandIn(f"{self._name}()")

    def __getitem__(self, key) -> _StandIn:
        return _StandIn(f"{self._name}[]")

    def __mro_entries__(self, bases) -> tuple:  # ``class Net(nn.Module)`` becomes a plain class
        return ()

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return True

    def __enter__(self) -> _StandIn:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def __repr__(self) -> str:
        return f"{_STAND_IN} {self._name}>"

    __str__ = __repr__


def _same(self, *args) -> _StandIn:
    return self


# Arithmetic and comparisons at module level (``-np.inf``, ``torch.Tensor | None``, ``2 * np.pi``).
for _op in ("neg pos abs invert add radd sub rsub mul rmul truediv rtruediv floordiv rfloordiv mod rmod "
            "pow rpow matmul rmatmul and rand or ror xor rxor lshift rshift lt le gt ge").split():
    setattr(_StandIn, f"__{_op}__", _same)
_StandIn.__int__ = _StandIn.__index__ = lambda self: 0
_StandIn.__float__ = lambda self: 0.0


class _StandInModule(types.ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__path__ = []  # a package: its submodules are stand-ins too

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _StandIn(f"{self.__name__}.{attr}")


class _HelpOnlyImports(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A meta path finder giving a :class:`_StandInModule` for every module that is neither in
    the standard library nor one of :data:`OWN_PACKAGES` (and not imported yet)."""

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in sys.stdlib_module_names or top in OWN_PACKAGES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        return _StandInModule(spec.name)

    def exec_module(self, module) -> None:
        pass


@contextlib.contextmanager
def _imports_undone():
    """Remove every non-stdlib module imported inside the block (and its attribute on its parent)."""
    before = set(sys.modules)
    try:
        yield
    finally:
        added = {n for n in set(sys.modules) - before if n.partition(".")[0] not in sys.stdlib_module_names}
        for name in sorted(added, reverse=True):
            module = sys.modules.pop(name)
            parent_name, _, child = name.rpartition(".")
            parent = sys.modules.get(parent_name)
            if parent is not None and getattr(parent, child, None) is module:
                with contextlib.suppress(AttributeError):
                    delattr(parent, child)


def _fast_help(module: str, func: str, argv: list[str]) -> tuple[int, str] | None:
    """``(status, help text)`` from the command's ``main(argv)`` with third-party modules replaced
    by stand-ins, or None when that did not give clean help (then import for real)."""
    if not hasattr(sys, "stdlib_module_names"):  # Python < 3.10
        return None
    finder = _HelpOnlyImports()
    out = io.StringIO()
    status: object = None
    with _imports_undone():
        sys.meta_path.insert(0, finder)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                status = getattr(importlib.import_module(module), func)(argv)
        except SystemExit as stop:
            status = stop.code
        except Exception:  # anything the stand-ins cannot imitate
            return None
        finally:
            sys.meta_path.remove(finder)
    text = out.getvalue()
    if status not in (0, None) or "usage:" not in text or _STAND_IN in text:
        return None
    return 0, text


# -- quiet output -------------------------------------------------------------------------------

class _DropAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("💡 Tip") or "litlogger" in message or "litmodels" in message)


@contextlib.contextmanager
def _quiet_third_parties():
    """While a command runs (and only then): no adverts, no library deprecation warnings."""
    loggers = [logging.getLogger(name)  # Lightning creates its rank-zero records on these loggers
               for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")]
    adverts = _DropAdverts()
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # Lightning, for in-memory data
        for logger in loggers:
            logger.addFilter(adverts)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(adverts)


# -- entry point ----------------------------------------------------------------------------------

def _run(name: str, module: str, func: str, argv: list[str]) -> int:
    try:
        return int(getattr(importlib.import_module(module), func)(argv) or 0)
    except SystemExit as stop:  # argparse inside a recipe: --help (0) or a usage error (2)
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except KeyboardInterrupt:
        print(f"prh-lightning {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # disk full, permission denied, a vanished folder: not a bug in the command
        if os.environ.get("PRH_DEBUG"):
            raise
        print(f"prh-lightning {name}: error: {err}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``prh-lightning <command> [options]``; returns the exit status.

    >>> main(["--version"])  # doctest: +ELLIPSIS
    prh-lightning ...
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        print(_version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"prh-lightning: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    if HELP_FLAGS & set(rest) and "torch" not in sys.modules:
        fast = _fast_help(module, func, rest)
        if fast is not None:
            print(fast[1], end="")
            return fast[0]
    with _quiet_third_parties():
        return _run(name, module, func, rest)


if __name__ == "__main__":
    sys.exit(main())
