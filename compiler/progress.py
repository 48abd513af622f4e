"""A one-line progress bar for long compiles, on a terminal only.

    sqk [##########--------------] codegen 41/97 kernels

The line is rewritten in place with ``\\r`` and erased when the compile ends,
so a finished compile leaves only its log.  It is drawn only when enabled:
``enabled=None`` means "when the stream is a terminal", so piped output,
CI logs and files never see control characters.
"""
from __future__ import annotations

import sys
import time


def is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Reports phases of work as one status line on ``stream`` (default: the
    current ``sys.stderr``).  ``enabled``: True draws, False is silent, None
    draws only when the stream is a TTY.  A disabled Progress writes nothing,
    so callers report unconditionally.  Use as a context manager (or call
    ``close()``) so the line is erased even when the work fails."""

    WIDTH = 24          # characters of the bar itself
    INTERVAL = 0.05     # seconds between redraws within one phase (a model may have thousands of kernels)

    def __init__(self, enabled: bool | None = None, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = is_tty(self.stream) if enabled is None else bool(enabled)
        self._shown = 0             # characters on screen now
        self._line = ""             # what was last drawn (redrawn after a log line)
        self._phase = None
        self._last = 0.0

    def update(self, phase: str, done: int | None = None, total: int | None = None, unit: str = "") -> None:
        """Show ``phase`` with ``done``/``total`` (a bar and "k/N unit") or, with
        no counts, the phase name alone."""
        if not self.enabled:
            return
        now = time.monotonic()
        final = done is not None and done == total
        if phase == self._phase and not final and now - self._last < self.INTERVAL:
            return
        self._phase, self._last = phase, now
        if total:
            fill = self.WIDTH * min(done, total) // total
            bar = "#" * fill + "-" * (self.WIDTH - fill)
            count = f" {done}/{total}" + (f" {unit}" if unit else "")
        else:
            bar, count = "." * self.WIDTH, ""
        self._draw(f"sqk [{bar}] {phase}{count}")

    def _draw(self, line: str) -> None:
        pad = " " * max(0, self._shown - len(line))  # cover the rest of a longer previous line
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self._shown, self._line = len(line), line

    def _erase(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0

    def wrap_log(self, log):
        """``log`` (a callable taking a line, or None) made to print below the
        bar: the bar is erased, the line printed, and the bar drawn again."""
        if log is None or not self.enabled:
            return log

        def logged(line: str) -> None:
            shown = self._line if self._shown else ""
            self._erase()
            log(line)
            if shown:
                self._draw(shown)
        return logged

    def close(self) -> None:
        """Erase the line (the bar leaves no trace)."""
        if self.enabled:
            self._erase()
            self._phase = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
