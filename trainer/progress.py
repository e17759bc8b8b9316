"""Progress of the trainer's loops: tqdm's bar on a terminal; elsewhere (a log file, a pipe) a plain
line every WIT_PROGRESS_SECONDS (10), as the pipeline's stages write, since a bar there is a file
full of carriage-return updates."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from tqdm import tqdm


class Progress:
    """tqdm's update, set_postfix and close; disable turns both the bar and the lines off (on every
    rank but the first, for one). emit takes each line (default: stderr)."""

    def __init__(self, total: int | None, desc: str, unit: str, units: str | None = None, *,
                 initial: int = 0, disable: bool = False, emit: Callable[[str], None] | None = None):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                        disable=True if disable else None)
        self.lines = not disable and self.bar.disable
        self.total, self.desc, self.unit, self.units = total, desc, unit, units or unit + "s"
        self.n = self.first = self.shown = initial
        self.postfix: dict = {}
        self.emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
        self.every = float(os.environ.get("WIT_PROGRESS_SECONDS", "10"))
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.update(n)
        if self.lines and time.monotonic() - self.last >= self.every:
            self.line()

    def set_postfix(self, **fields) -> None:
        self.postfix = fields
        self.bar.set_postfix(**fields)

    def line(self) -> None:
        """'train: step 40 of 200 (20%), 3.21 steps/s, ETA 00:50; loss 4.1, ...'"""
        self.last, self.shown = time.monotonic(), self.n
        rate = (self.n - self.first) / max(self.last - self.start, 1e-9)
        text = f"{self.desc}: {self.unit} {self.n:,}"
        if self.total:
            text += f" of {self.total:,} ({100 * self.n / self.total:.0f}%)"
        text += f", {rate:.2f} {self.units}/s"
        if self.total:
            left = (self.total - self.n) / rate if rate else None
            text += f", ETA {tqdm.format_interval(left) if left is not None else '?'}"
        if self.postfix:
            text += "; " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        self.emit(text)

    def close(self, last_line: bool = True) -> None:
        """Ends with a line for the final count, unless the last one already showed it."""
        self.bar.close()
        if self.lines and last_line and self.n != self.shown:
            self.line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, error, *_) -> None:
        self.close(last_line=error is None)
