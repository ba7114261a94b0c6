"""Figures 1(b) and 2(b) of the paper: what a sampler keeps.

- Fig. 1(b): tau over (cdf f1, cdf f2) on the unit square, ``(f1, f2)`` the sampler's feature
  pair (the paper's loss and E^r by default). tau is a function of the two cdf values alone
  (``t = T(c1*f1 + c2*f2)``, then ``H``), so the map is drawn on a regular grid of (f1, f2), with
  the store's crops as density contours for reference.
- Fig. 2(b): mean tau of the store's crops by f1 percentile (100 bins of the crops' own f1
  ranks), with the share of crops the sampler never keeps (tau = 0).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from swift_sampler.pipeline.sampler.file import load_sampler
from swift_sampler.pipeline.sampler.pair import read_pair_columns
from swift_sampler.storage import StoreError, StoreLayout, atomic_writer

GRID = 256
PERCENTILE_BINS = 100


def plot_sampler(sampler_path: str | os.PathLike, store: str | os.PathLike,
                 out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Draw Fig. 1(b) and Fig. 2(b) for a sampler file over a store's features; write PNGs.

    Args:
        sampler_path: a sampler file (``best_sampler.json``).
        store: store directory whose features (``features/part-*.parquet``) are plotted.
        out_dir: folder for the PNGs; default: the sampler file's folder.

    Returns:
        ``[tau map PNG, tau by f1 percentile PNG]``, each written atomically, named after the
        sampler file (``<stem>_tau_map.png``, ``<stem>_tau_by_<f1>.png``: ``_tau_by_loss.png``
        for the paper's pair).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sampler_path = Path(sampler_path)
    sampler, _ = load_sampler(sampler_path)
    layout = StoreLayout(store).require()
    if not layout.feature_parts():
        raise StoreError(f"{layout.root} has no features; run `swift-sampler pipeline build-features` first")
    pair = sampler.pair
    n1, n2 = pair.features
    cols = read_pair_columns(layout.root, pair)
    loss, er = cols[n1], cols[n2]  # the paper's names for f1 and f2
    labels = cols.get("label")
    tau = sampler.tau_columns(cols).astype(np.float64)
    name1, name2 = (_label(n) for n in pair.features)
    folder = Path(out_dir) if out_dir is not None else sampler_path.parent
    stem = sampler_path.stem
    p = sampler.parameters()
    title = (f"{sampler.transform}, c=({p['c1']:.2f}, {p['c2']:.2f}), "
             f"e=({p['e1']:.2f}, {p['e2']:.2f}, {p['e3']:.2f}), "
             "v=(" + ", ".join(f"{p[f'v{s}']:.2f}" for s in range(5)) + ")")

    # Fig. 1(b): cell centres of a GRID x GRID lattice of the unit square.
    u = (np.arange(GRID) + 0.5) / GRID
    f1, f2 = np.meshgrid(u, u)  # f2 varies along rows: image row = cdf f2
    tau_map = sampler.tau_from_cdf(f1, f2, precise=True)
    fig, ax = plt.subplots(figsize=(6.2, 5.2), constrained_layout=True)
    im = ax.imshow(tau_map, origin="lower", extent=(0, 1, 0, 1), aspect="auto", cmap="viridis",
                   vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="sampling probability tau")
    if sampler.tables is not None:
        # The crops' own position, so the eye sees where the data actually lies.
        g1 = sampler.tables.feature_cdf(n1, loss, labels)
        g2 = sampler.tables.feature_cdf(n2, er, labels)
        k = int(np.clip(np.sqrt(loss.size) / 4, 8, 32))  # few crops: coarser cells, less noise
        hist, _, _ = np.histogram2d(g1, g2, bins=k, range=[[0, 1], [0, 1]])
        centres = (np.arange(k) + 0.5) / k
        if hist.max() > 0:
            ax.contour(centres, centres, hist.T / hist.max(), levels=[0.1, 0.3, 0.6], colors="white",
                       linewidths=0.7, alpha=0.8)
    ax.set_xlabel(f"cdf({name1})")
    ax.set_ylabel(f"cdf({name2})")
    ax.set_title(f"tau over (cdf {name1}, cdf {name2})\n{title}", fontsize=9)
    map_png = _save(fig, folder / f"{stem}_tau_map.png", plt)

    # Fig. 2(b): the crops' f1 percentile from their own ranks (ties share the lowest bin; the
    # nulls of a per-image feature sort last).
    n = loss.size
    ranks = np.searchsorted(np.sort(loss), loss, side="left")  # equal values share a percentile
    pct = np.minimum(ranks * PERCENTILE_BINS // max(n, 1), PERCENTILE_BINS - 1)
    count = np.bincount(pct, minlength=PERCENTILE_BINS)
    mean_tau = np.bincount(pct, weights=tau, minlength=PERCENTILE_BINS) / np.maximum(count, 1)
    zero = np.bincount(pct, weights=(tau <= 0).astype(np.float64), minlength=PERCENTILE_BINS) / np.maximum(count, 1)
    x = np.arange(PERCENTILE_BINS) + 0.5
    fig, ax = plt.subplots(figsize=(7.0, 4.2), constrained_layout=True)
    has = count > 0
    ax.bar(x[has], mean_tau[has], width=1.0, color="tab:blue", alpha=0.8, label="mean tau")
    ax.plot(x[has], zero[has], color="tab:red", lw=1.2, label="share with tau = 0")
    ax.set_xlim(0, PERCENTILE_BINS)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"{n1} percentile of the crop (%)")
    ax.set_ylabel("mean sampling probability")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"mean tau by {n1} percentile ({n:,} crops of {layout.root.name})\n{title}", fontsize=9)
    bars_png = _save(fig, folder / f"{stem}_tau_by_{n1}.png", plt)
    return [map_png, bars_png]


def _label(name: str) -> str:
    return "$E^r$" if name == "entropy_r" else name


def _save(fig, path: Path, plt) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_writer(path, "wb") as f:
        f.write(buf.getvalue())
    return path
