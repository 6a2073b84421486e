"""The one progress bar of calibration (rich), or nothing."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["Progress"]

log = logging.getLogger(__name__)


class Progress:
    """A rich progress bar on stderr titled ``title`` over ``total`` steps when ``enabled``; each step logged at debug level."""

    def __init__(self, title: str, total: int, enabled: bool) -> None:
        self.title, self.total, self.enabled = title, total, enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self._progress = Bar(TextColumn(self.title), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[step]}"),
                                 TimeElapsedColumn(), console=Console(stderr=True))
            self._progress.__enter__()
            self._task = self._progress.add_task("calibrate", total=self.total, step="")
        return self

    def extend(self, n: int) -> None:
        """``n`` more steps (another calibration pass)."""
        self.total += n
        if self._progress is not None:
            self._progress.update(self._task, total=self.total)

    def advance(self, step: str) -> None:
        """One step done; ``step`` says which."""
        log.debug("%s: %s", self.title, step)
        if self._progress is not None:
            self._progress.update(self._task, advance=1, step=step)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
