"""Errors a user can cause are values: a parameter, what is wrong, how to fix it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_STOPPED = 3


@dataclass(frozen=True)
class Problem:
    parameter: str
    message: str

    def line(self) -> str:
        return f"{self.parameter}: {self.message}"

    def as_dict(self) -> dict:
        return asdict(self)


def problem(parameter: str, what: str, fix: str = "") -> Problem:
    """One line: `<parameter>: <what is wrong>. <how to fix it>`."""
    what = what.rstrip(".")
    fix = fix if fix.endswith(("?", "!")) else fix.rstrip(".") + "." if fix else ""
    text = f"{what}. {fix}" if fix else f"{what}."
    return Problem(parameter, text)


class InvalidConfig(Exception):
    """The parameters or the data cannot work; nothing was trained or written."""

    def __init__(self, errors: list[Problem], warnings: list[Problem] | None = None):
        self.errors = list(errors)
        self.warnings = list(warnings or [])
        super().__init__("\n".join(p.line() for p in self.errors))

    def __reduce__(self):
        # Raised inside dataset worker processes too: it must cross back to the parent whole.
        return (InvalidConfig, (self.errors, self.warnings))


class StopRequested(Exception):
    """The user asked the run to stop (signal or the host's stop flag): at `step` (0: before the first), with
    `checkpoint` the newest complete one (None: none was saved); `logged`: the losses and learning rates the
    ranks logged until then. `leave`: what the run leaves once the job is STOPPED (its loss curve), after the status
    because a task's host kills the run seconds after its Stop."""

    def __init__(self, step: int = 0, checkpoint: str | None = None, logged: list[dict] | None = None):
        self.step = step
        self.checkpoint = checkpoint
        self.logged = logged or []
        self.leave: Callable[[], object] | None = None
        super().__init__(step, checkpoint)


class RunFailed(Exception):
    """Training failed after it started; the message says why."""


class RowProblem(ValueError):
    """A row that cannot be used: the parameter to name, the data column at fault, what is wrong and the fix.
    The caller adds the row number."""

    def __init__(self, parameter: str, column: str, what: str, fix: str):
        super().__init__(parameter, column, what, fix)
        self.parameter, self.column, self.what, self.fix = parameter, column, what, fix

    def __str__(self) -> str:
        return f"column {self.column!r} {self.what}" if self.column else self.what
