"""What the console shows: only what a user can act on, and progress of long stages.

``quiet(verbose)`` turns Optuna's per-trial INFO lines (hpo prints its own, with units) and MLflow's
INFO lines off, and hides warnings about library internals (Optuna's experimental features used by hpo
itself, MLflow's pickling and SQLAlchemy notes); ``verbose: true`` in the root config keeps them all.

``Bar`` shows the progress of a long stage (MD steps, frames): a bar redrawn in place on a terminal,
plain lines every ``every_s`` seconds otherwise (batch logs must not fill with carriage returns).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import TextIO

# Warnings about how libraries work inside, not about anything in the user's config or data.
INTERNAL_WARNINGS = (
    r".*is experimental \(supported from v.*",  # optuna.exceptions.ExperimentalWarning (heartbeats, importances)
    r".*Support for class-based `config` is deprecated.*",  # pydantic, inside MLflow
)


class _DropInternal(logging.Filter):
    """MLflow logs, at WARNING, that a model logged from code (no pickle: hpo's way) has no CloudPickle version."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CloudPickle" not in record.getMessage()


class _DropInterrupted(logging.Filter):
    """Optuna logs a trial ended by a signal (SIGTERM, Ctrl-C: a KeyboardInterrupt) at WARNING with its
    traceback, which ends wherever the signal landed (often inside quippy's Fortran wrapper), and then
    "Trial N failed with value None."; hpo says it in one paragraph (hpo.cli) and records the trial."""

    def __init__(self):
        super().__init__()
        self.interrupted: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            self.interrupted.add(message.split(" failed", 1)[0])  # "Trial N"
            return False
        return message.split(" failed with value", 1)[0] not in self.interrupted


def quiet(verbose: bool = False) -> None:
    """Console defaults of every command (and every worker process): see the module docstring."""
    if verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO")
        return
    # read by MLflow when it configures its loggers at import, also in spawned worker processes
    os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    pyfunc_logger = logging.getLogger("mlflow.pyfunc")
    if not any(isinstance(f, _DropInternal) for f in pyfunc_logger.filters):
        pyfunc_logger.addFilter(_DropInternal())
    for pattern in INTERNAL_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    try:
        from sqlalchemy.exc import SAWarning

        warnings.filterwarnings("ignore", category=SAWarning)
    except ImportError:  # pragma: no cover - SQLAlchemy comes with Optuna and MLflow
        pass
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial_logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _DropInterrupted) for f in trial_logger.filters):
        trial_logger.addFilter(_DropInterrupted())
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class Bar:
    """Progress of ``total`` units of work: ``update(n)`` after each, ``close()`` at the end (or use ``with``).

    On a terminal: ``label [#####.....] 120/200 steps, 3.1 s left`` redrawn in place. Otherwise (a log
    file, a batch job): one such line at most every ``every_s`` seconds, and the last one.
    """

    WIDTH = 30

    def __init__(self, total: int, label: str, unit: str = "", stream: TextIO | None = None, every_s: float = 10.0, tty: bool | None = None):
        self.total = max(int(total), 0)
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self.done = 0
        self.started = time.perf_counter()
        self.last_line = -float("inf")
        self.closed = False

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self) -> str:
        fraction = self.done / self.total if self.total else 1.0
        elapsed = time.perf_counter() - self.started
        left = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        unit = f" {self.unit}" if self.unit else ""
        timing = f"{left:.0f} s left" if fraction < 1 and left == left else f"{elapsed:.0f} s"
        if self.tty:
            filled = int(round(self.WIDTH * fraction))
            return f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total}{unit}, {timing}"
        return f"{self.label}: {self.done}/{self.total}{unit} ({100 * fraction:.0f}%), {timing}"

    def update(self, n: int = 1) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        """``done`` units finished so far (e.g. an integrator's step count)."""
        self.done = min(done, self.total) if self.total else done
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif now - self.last_line >= self.every_s and self.done < self.total:
            self.last_line = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.tty:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
        else:
            print(self.line(), file=self.stream, flush=True)


def format_value(value, digits: int = 5) -> str:
    """A value in a console or report table: floats to ``digits`` significant digits, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
