"""A one-line progress display for long stages (hashing W, covariance, eigendecomposition, writing).

It draws only when stdout is a terminal (and REFFRAME_PROGRESS is not 0), on a single line that is
erased when the stage ends, so logs, pipes and captured output never see it. Stages with a known
size show a bar (`update(done, total)`); one long native call shows a spinner with the elapsed time,
optionally with a label that changes while it runs (e.g. covariance -> eigendecomposition).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

ENV = "REFFRAME_PROGRESS"  # 0: never draw; 1: draw even when stdout is not a terminal
SPINNER = "|/-\\"


def enabled(stream: TextIO | None = None) -> bool:
    """Whether a progress line should be drawn on `stream` (default: stdout)."""
    forced = os.environ.get(ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty()) and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError, OSError):
        return False


class Stage:
    """One running stage: `update(done, total)` moves its bar; the spinner thread redraws it."""

    def __init__(
        self,
        progress: Progress,
        label: str | Callable[[], str],
        poll: Callable[[], tuple[int, int] | None] | None = None,
    ):
        self._progress = progress
        self._label = label
        self._poll = poll
        self._done = 0
        self._total = 0
        self.t0 = time.perf_counter()

    def label(self) -> str:
        return self._label() if callable(self._label) else self._label

    def update(self, done: int, total: int) -> None:
        self._done, self._total = done, total
        self._progress._draw(self, force=done >= total)

    def line(self, tick: int) -> str:
        elapsed = time.perf_counter() - self.t0
        if self._poll is not None:  # a bar while the poll has numbers, else the spinner
            self._done, self._total = self._poll() or (0, 0)
        if self._total > 0:
            frac = min(1.0, self._done / self._total)
            width = 24
            fill = int(frac * width)
            bar = "#" * fill + "." * (width - fill)
            return f"  {self.label()} [{bar}] {frac * 100:5.1f}%  {elapsed:5.1f} s"
        return f"  {self.label()} {SPINNER[tick % len(SPINNER)]} {elapsed:5.1f} s"


class Progress:
    """Progress lines on `stream` (stdout by default); a no-op when not enabled."""

    def __init__(self, stream: TextIO | None = None, *, enable: bool | None = None, interval: float = 0.1):
        self.stream = sys.stdout if stream is None else stream
        self.enabled = enabled(self.stream) if enable is None else enable
        self.interval = interval
        self._lock = threading.Lock()
        self._tick = 0
        self._last_draw = 0.0
        self._width = 0

    @contextlib.contextmanager
    def stage(
        self, label: str | Callable[[], str], poll: Callable[[], tuple[int, int] | None] | None = None
    ) -> Iterator[Stage]:
        """Show `label` with a spinner and the elapsed time (a bar once update() is called, or while
        `poll()` returns (done, total)) until the block ends; the line is then erased."""
        st = Stage(self, label, poll)
        if not self.enabled:
            yield st
            return
        stop = threading.Event()

        def spin() -> None:
            while not stop.wait(self.interval):
                self._draw(st, force=True)

        thread = threading.Thread(target=spin, name="refframe-progress", daemon=True)
        self._draw(st, force=True)
        thread.start()
        try:
            yield st
        finally:
            stop.set()
            thread.join()
            self._clear()

    def _draw(self, st: Stage, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        with self._lock:
            if not force and now - self._last_draw < self.interval:
                return
            self._last_draw = now
            self._tick += 1
            text = st.line(self._tick)
            pad = max(0, self._width - len(text))
            self._width = len(text)
            try:
                self.stream.write("\r" + text + " " * pad)
                self.stream.flush()
            except (OSError, ValueError):
                self.enabled = False

    def _clear(self) -> None:
        with self._lock:
            if self._width:
                try:
                    self.stream.write("\r" + " " * self._width + "\r")
                    self.stream.flush()
                except (OSError, ValueError):
                    self.enabled = False
            self._width = 0


QUIET = Progress(enable=False)
