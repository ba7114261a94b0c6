"""Progress of a search from Python: a tqdm bar over the trials and one log line per trial.

The command line prints its own table (``swift-sampler search run``); ``learn_sampler`` uses
this so that a search of several minutes is not silent there either.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from tqdm import tqdm

log = logging.getLogger("swift_sampler.search")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrialProgress:
    """``on_trial`` for ``search.run.search``: logs each finished trial at INFO and moves a
    tqdm bar (trials done / done + remaining, best val top-1, ETA); ``bar=False`` logs only."""

    def __init__(self, name: str, *, bar: bool = True) -> None:
        self.name, self.show_bar, self.bar = name, bar, None

    def __call__(self, row: dict[str, Any], progress: dict[str, Any]) -> None:
        done, remaining = int(row["trial"]) + 1, int(progress["remaining"])
        best = progress["best"]["score"] if progress.get("best") else math.nan
        log.info("search %s: trial %d (%s) val top-1 %.2f%%, kept %.0f%%, %.1f s, %s; best %.2f%%; "
                 "%d to go, ETA %s", self.name, row["trial"], row["phase"], 100 * row["score"],
                 100 * row["kept_fraction"], row["seconds"], row["status"], 100 * best, remaining,
                 _duration(progress["eta_s"]))
        if not self.show_bar:
            return
        if self.bar is None:  # a resumed search starts at the trials already done
            self.bar = tqdm(total=done + remaining, initial=done - 1, desc=f"search {self.name}",
                            unit="trial")
        self.bar.total = done + remaining
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(best=f"{100 * best:.2f}%", phase=row["phase"])

    def announce(self, line: str) -> None:
        """Before the full-run check (which logs ``line`` itself): the trials are over, so the
        bar closes before the check's training bars start."""
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
