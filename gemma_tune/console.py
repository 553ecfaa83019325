"""What a run shows on the terminal: log lines, and one progress bar below them.

`ConsoleHandler` prints gemma_tune's log records to stderr through `tqdm.write`, which clears the bar,
prints the line and redraws the bar under it: log lines never glue onto the bar. `ProgressBar` is the
one bar of a training run (tqdm; drawn only on a terminal). Its ETA comes from the steps after the
first, which compiles: the bar appears once that step is done, and until then a log line says that the
first step is compiling. `without_native_start_up_lines()` keeps TensorFlow's native start-up lines off
the terminal where another backend's run needs TensorFlow.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

from tqdm import tqdm

NATIVE_START_UP = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called|cudart_stub\.cc:\d+\]|port\.cc:\d+\] oneDNN custom "
    r"operations|cuda_platform\.cc:\d+\] failed call to cuInit|normalizer\.cc\(\d+\) LOG\(INFO\) precompiled_charsmap")


@contextmanager
def without_native_start_up_lines() -> Iterator[None]:
    """Run the block with the process's stderr (file descriptor 2) captured, then pass on every line of it
    but TensorFlow's native start-up lines (`NATIVE_START_UP`: written before its logging is set up, so
    TF_CPP_MIN_LOG_LEVEL does not reach them) and the info line of tensorflow_text's sentencepiece.
    For code that needs TensorFlow on another backend (the keras export: Keras' saving and keras-hub
    import it)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not NATIVE_START_UP.search(line)))
            sys.stderr.flush()


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
