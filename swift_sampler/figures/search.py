"""Figure 3 of the paper: best-so-far score by trial for one or more searches on one axis.

The paper compares GP-UCB with T = cgf, GP-UCB with T = cdf and random search on the same
store; each curve is labelled with its search name, agent and transform (from ``search.json``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from swift_sampler.search.loop import best_so_far, read_settings, read_trials
from swift_sampler.storage import StoreError, StoreLayout, atomic_write_bytes


def plot_search(store, names, out=None) -> Path:
    """Draw best-so-far val top-1 (failed trials count as no improvement) against trial number.

    Args:
        store: store directory.
        names: one or more search names (``STORE/searches/NAME``).
        out: PNG path; default ``STORE/figures/search.png``.

    Returns:
        the path written (atomically).

    Raises:
        StoreError: a search with no finished trials (the message lists the searches there).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layout = StoreLayout(store).require()
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise StoreError("name at least one search to plot")
    curves = []
    for name in names:
        trials = read_trials(layout.search(name) / "trials.parquet")
        if not trials:
            have = sorted(p.parent.name for p in layout.searches_dir.glob("*/trials.parquet"))
            raise StoreError(f"search {name!r} has no finished trials in {layout.root} "
                             f"(searches with trials: {', '.join(have) or 'none'})")
        settings = read_settings(layout.root, name) or {}
        label = name
        if settings.get("agent"):
            label += f" ({settings['agent']}, T={settings.get('transform', '?')})"
        # The agent's trials, numbered as in trials.parquet and `search show` (from 0); the
        # noise and guard re-evaluations are not part of the search's progress.
        trials = [t for t in trials if t["phase"] == "search"]
        scores = np.array([t["score"] if t["status"] == "ok" else np.nan for t in trials])
        numbers = np.array([t["trial"] for t in trials])
        curves.append((label, best_so_far(trials), scores, numbers))

    out = Path(out) if out else layout.root / "figures" / "search.png"
    fig, ax = plt.subplots(figsize=(7.5, 4.6), constrained_layout=True)
    for (label, best, scores, x), colour in zip(curves, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9):
        ax.step(x, 100 * best, where="post", color=colour, lw=2, label=label)
        ax.scatter(x, 100 * scores, color=colour, s=12, alpha=0.35)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("Search: best-so-far val top-1 (lines) and each trial's score (dots)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out
