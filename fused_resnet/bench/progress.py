"""A progress bar on a terminal (tqdm), plain timestamped lines elsewhere (logs, or where tqdm is absent)."""

from __future__ import annotations

import os
import sys
import time


class Progress:
    """Counts finished units of work and shows what is running now."""

    def __init__(self, total: int, desc: str = "bench") -> None:
        self.total, self.done, self.desc = total, 0, desc
        self._start = time.monotonic()
        self._bar = None
        plain = os.environ.get("FUSED_RESNET_BENCH_PLAIN", "") not in ("", "0")
        if sys.stderr.isatty() and not plain:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc=desc, unit="group", dynamic_ncols=True)

    def note(self, message: str) -> None:
        """What is running now (the bar's postfix, or one printed line)."""
        if self._bar is not None:
            self._bar.set_postfix_str(message[:60], refresh=True)
        else:
            elapsed = time.monotonic() - self._start
            print(f"[{self.desc} {self.done}/{self.total} {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
