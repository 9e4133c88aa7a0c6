"""A live progress line on stderr: done, errors, in flight, current completion rate.

On a terminal the line is redrawn in place (``\\r``) twice a second; otherwise (a log file,
CI) one line is printed every ``log_every_s`` seconds, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import TextIO


class Progress:
    def __init__(
        self,
        total: int | None,
        label: str = "",
        stream: TextIO | None = None,
        enabled: bool = True,
        log_every_s: float = 10.0,
    ) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.log_every_s = log_every_s
        self.sent = self.done = self.errors = 0
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._recent: deque[float] = deque()  # completion times in the last 10 s

    def on_sent(self) -> None:
        self.sent += 1

    def on_done(self, ok: bool) -> None:
        self.done += 1
        self.errors += not ok
        self._recent.append(time.perf_counter())
        self.tick()

    def rate(self) -> float:
        now = time.perf_counter()
        while self._recent and now - self._recent[0] > 10.0:
            self._recent.popleft()
        window = min(10.0, now - self.t0)
        return len(self._recent) / window if window > 0 else 0.0

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
            head = f"[{bar}] {self.done}/{self.total}"
        else:
            head = f"{self.done} done"
        return (
            f"{self.label}{head} | errors {self.errors} | in flight {self.sent - self.done}"
            f" | {self.rate():.2f} req/s | {elapsed:.1f} s"
        )

    def tick(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        every = 0.5 if self.tty else self.log_every_s
        if not force and now - self._last_draw < every:
            return
        self._last_draw = now
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.tick(force=True)
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
