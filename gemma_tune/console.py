"""What a run shows on the terminal: log lines, and one progress bar below them.

`ConsoleHandler` prints gemma_tune's log records to stderr through `tqdm.write`, which clears the bar,
prints the line and redraws the bar under it: log lines never glue onto the bar. `ProgressBar` is the
one bar of a training run (tqdm; drawn only on a terminal). Its ETA comes from the steps after the
first, which compiles: the bar appears once that step is done, and until then a log line says that the
first step is compiling.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm


class ConsoleHandler(logging.Handler):
    """Log records as plain lines on stderr, above any progress bar."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


def use_console(logger: logging.Logger) -> None:
    """Give `logger` one ConsoleHandler (idempotent) and INFO level."""
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        logger.addHandler(ConsoleHandler())


class ProgressBar:
    """Steps done of `total`, with the latest figures (`update(step, **figures)`)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self._bar: tqdm | None = None

    def update(self, step: int, **figures) -> None:
        if not self.enabled:
            return
        if self._bar is None:  # the first step (compiled) is behind us: rates and ETA start from here
            self._bar = tqdm(total=self.total, initial=step, unit="step", dynamic_ncols=True, leave=True,
                             file=sys.stderr, disable=None)
        else:
            self._bar.update(step - self._bar.n)
        self._bar.set_postfix(figures, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
