"""Console progress for phases that can take a while: say what is happening and how far it is.

A :class:`Progress` stays silent for a phase that ends within ``quiet_s`` (the toy model's SVD
takes 46 ms: tests and the demo print nothing new), then prints ``[t2dist] <what>: <done>/<total>
(<seconds>s)`` at most every ``every_s`` seconds and a last line when the phase ends.  Lines go
to stdout with a flush, so a Ray actor's lines reach the driver's console (``log_to_driver``).
"""
from __future__ import annotations

import time
from typing import Callable


class Progress:
    def __init__(self, what: str, total: int | None = None, *, quiet_s: float = 2.0, every_s: float = 5.0,
                 out: Callable[[str], None] | None = None):
        self.what, self.total, self.quiet_s, self.every_s = what, total, quiet_s, every_s
        self.out = out or (lambda line: print(line, flush=True))
        self.t0 = time.perf_counter()
        self.last = None  # when the last line was printed (None: nothing printed yet)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def update(self, done: int, note: str = "") -> None:
        """``done`` of ``total`` finished; prints when the phase is slow and the last line is old enough."""
        now = time.perf_counter()
        if now - self.t0 < self.quiet_s or (self.last is not None and now - self.last < self.every_s):
            return
        self.last = now
        of = f"/{self.total}" if self.total is not None else ""
        self.out(f"[t2dist] {self.what}: {done}{of}{f' {note}' if note else ''} ({now - self.t0:.0f}s)")

    def finish(self, note: str = "") -> None:
        """The last line, when the phase took longer than ``quiet_s``."""
        if self.seconds >= self.quiet_s:
            self.out(f"[t2dist] {self.what}: done in {self.seconds:.1f}s{f' ({note})' if note else ''}")
