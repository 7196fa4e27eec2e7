"""What a tracker does when a reference, the probe pass or a metric fails: raise, or warn once
per (what failed, cause) and go on (the failed values are recorded as NaN).

On a multi-day run a diverged model fails the same way at every check; a warning per check
(or per step number in the text) would bury the log, so a failure is reported the first time
its kind is seen and the key ignores the numbers that change from check to check.

>>> failures = Failures("warn")
>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     for step in range(3):
...         failures.report("layer 'fc'", ValueError(f"NaN in row {step}"))
>>> len(caught)
1
"""

from __future__ import annotations

import re
import warnings

ON_ERROR = ("warn", "raise")
_NUMBER = re.compile(r"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?")


class Failures:
    """``on_error="warn"``: :meth:`report` warns once per ``(where, cause)``; ``"raise"``: it re-raises."""

    def __init__(self, on_error: str = "warn", owner: str = "AlignmentTracker") -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.owner = owner
        self.seen: set[tuple[str, str]] = set()

    def report(self, where: str, err: BaseException) -> None:
        """Raise ``err`` (``"raise"``) or warn about it unless this ``where`` already failed this way."""
        if self.on_error == "raise":
            raise err
        cause = f"{type(err).__name__}: {_NUMBER.sub('#', str(err))}"
        if (where, cause) in self.seen:
            return
        self.seen.add((where, cause))
        message = str(err).splitlines()[0] if str(err) else ""
        warnings.warn(
            f"{self.owner}: {where} failed ({type(err).__name__}: {message}); its values are recorded as NaN "
            "and skipped, training goes on. Further failures of this kind are not reported "
            "(pass on_error='raise' to stop at the first failure).",
            UserWarning,
            stacklevel=3,
        )
