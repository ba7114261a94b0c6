"""Figure 1(a) of the paper: where the flipped labels lie in (cdf loss, cdf E^r) space.

Diagnostics: this figure reads the ground truth (``noisy``) from the ``features`` view, which
joins ``samples``; nothing it computes flows back into features, tables or samplers.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from swift_sampler.storage import StoreError, StoreLayout, atomic_write_bytes, query

_SQL = "SELECT cdf_loss, cdf_entropy_r, coalesce(noisy, false) AS noisy FROM features"


def plot_noise_density(store, out=None, *, bins: int = 30) -> Path:
    """Draw the density of flipped and clean crops over (cdf loss, cdf E^r) and write a PNG.

    Panels: flipped crops, clean crops (each a 2-D histogram normalised to density), and the
    share of flipped crops per cell. With 40% symmetric noise the paper finds the flipped samples
    at high loss and low E^r (a peaked non-target distribution: the model prefers one wrong class).

    Args:
        store: store directory with features.
        out: PNG path; default ``STORE/figures/noise_density.png``.
        bins: histogram cells per axis.

    Returns:
        the path written (atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    layout = StoreLayout(store).require()
    if not layout.feature_parts():
        raise StoreError(f"{layout.root} has no features; run `swift-sampler pipeline build-features` first")
    rows = query(layout.root, _SQL)
    x = rows["cdf_loss"].to_numpy()
    y = rows["cdf_entropy_r"].to_numpy()
    noisy = rows["noisy"].to_numpy(zero_copy_only=False).astype(bool)
    out = Path(out) if out else layout.root / "figures" / "noise_density.png"

    edges = np.linspace(0.0, 1.0, bins + 1)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), constrained_layout=True)
    for ax, mask, title, cmap in ((axes[0], noisy, "flipped labels", "magma"),
                                  (axes[1], ~noisy, "clean labels", "viridis")):
        n = int(mask.sum())
        if n:
            hist, _, _ = np.histogram2d(x[mask], y[mask], bins=[edges, edges], density=True)
            # Square-root colour scale: the noisy corner would otherwise hide everything else.
            im = ax.imshow(hist.T, origin="lower", extent=(0, 1, 0, 1), aspect="auto", cmap=cmap,
                           norm=PowerNorm(0.5, vmin=0))
            fig.colorbar(im, ax=ax, label="density (sqrt scale)")
        else:
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{title} ({n:,} crops)")
    all_hist, _, _ = np.histogram2d(x, y, bins=[edges, edges])
    flip_hist, _, _ = np.histogram2d(x[noisy], y[noisy], bins=[edges, edges])
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(all_hist > 0, flip_hist / all_hist, np.nan)
    im = axes[2].imshow(share.T, origin="lower", extent=(0, 1, 0, 1), aspect="auto", cmap="RdYlGn_r",
                        vmin=0, vmax=1)
    fig.colorbar(im, ax=axes[2], label="share flipped")
    axes[2].set_title(f"share of flipped crops (overall {noisy.mean():.1%})")
    for ax in axes:
        ax.set_xlabel("cdf(loss)")
        ax.set_ylabel("cdf($E^r$)")
    fig.suptitle(f"Noise density in (loss, $E^r$) space: {layout.root.name}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out
