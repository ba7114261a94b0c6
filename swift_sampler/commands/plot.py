"""``swift-sampler plot ...``: the paper's figures as PNG files."""

from __future__ import annotations

import importlib

from ..cli import add_json_flag, add_store_option, emit


def register(sub, groups) -> None:
    plot = groups["plot"]

    p = plot.add_parser("noise-density", help="Fig. 1(a): density of flipped samples over (cdf loss, cdf E^r)")
    add_store_option(p, positional=True)
    p.add_argument("--out", help="PNG path (default: STORE/figures/noise_density.png)")
    add_json_flag(p)
    p.set_defaults(func=_run("noise_density", "plot_noise_density", lambda a: dict(store=a.store, out=a.out)))

    p = plot.add_parser("sampler", help="Fig. 1(b) tau over (cdf loss, cdf E^r) and Fig. 2(b) mean tau by loss percentile")
    p.add_argument("sampler", help="sampler file (best_sampler.json)")
    p.add_argument("--store", required=True, help="store whose features to plot over")
    p.add_argument("--out-dir", help="folder for the PNGs (default: beside the sampler file)")
    add_json_flag(p)
    p.set_defaults(func=_run("sampler", "plot_sampler",
                             lambda a: dict(sampler_path=a.sampler, store=a.store, out_dir=a.out_dir)))

    p = plot.add_parser("search", help="Fig. 3: best-so-far score by trial for one or more searches")
    add_store_option(p, positional=True)
    p.add_argument("names", nargs="+", help="search names")
    p.add_argument("--out", help="PNG path (default: STORE/figures/search.png)")
    add_json_flag(p)
    p.set_defaults(func=_run("search", "plot_search", lambda a: dict(store=a.store, names=a.names, out=a.out)))


def _run(module: str, function: str, kwargs):
    def handler(args) -> int:
        fn = getattr(importlib.import_module(f"swift_sampler.figures.{module}"), function)
        paths = fn(**kwargs(args))
        paths = [paths] if not isinstance(paths, (list, tuple)) else list(paths)
        emit({"command": f"plot {module}", "figures": [str(p) for p in paths]}, args,
             "\n".join(f"wrote {p}" for p in paths))
        return 0

    return handler
