"""Which inner loop ranks samplers the way training from scratch does?

A fixed panel of samplers (points of the 10 parameters, saved with the results) is trained
from scratch with the noisy-CIFAR benchmark recipe at several seeds: that is the truth, scored
by top-1 on the noisy val split (as the search sees it; clean test is a diagnostic column).
Every candidate proxy (an inner loop and a score of its model) scores every panel sampler, and
the uniform sampler again at further seeds to measure the proxy's seed noise. Reported per
proxy: Spearman's rho with the truth over the sensible part of the panel (the inverted shapes
left out: every proxy ranks them last, which would flatter it) and over the whole panel, the
proxy's rank of the truth's best sampler, the seed noise and the cost in epochs per trial.

Proxies (E_f = the benchmark's ``finetune_epochs``):
- ``finetune``: E_f epochs from ``w_share`` at ``finetune_lr_fraction`` x its lr, cosine to 0,
  a distinct seed per sampler (the search's inner loop before this study);
- ``finetune-crn``: the same with common random numbers (one seed for every sampler: same
  data order, augmentation and filter keys);
- ``early-crn``: ``w_share``'s own run resumed from its checkpoint E_f epochs before the end
  (before the low-lr tail in which a network fits noisy labels), continuing its schedule with
  the sampler; common seed;
- ``scratch-crn``: E_f epochs from scratch (one-cycle over E_f epochs) on all the data with
  the sampler; common seed.
Each is scored by val top-1 and by the mean predicted probability of the val label ("prob"),
a smoother score of the same labels.

Every unit of work (one training) is saved to ``OUT/units/NAME.json`` when it finishes, so a
killed run resumes where it stopped; ``--report-only`` re-renders ``results.json`` and
``results.md`` from the units. Ground truth of the noise is never read by a sampler or proxy.

    python bench/bench_inner_loop.py --data ../shared/datasets/cifar10/train --out results/inner-loop
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# The proxies, in the order they are run, and their cost in epochs per trial (x E_f).
PROXIES = ("finetune", "finetune-crn", "early-crn", "scratch-crn")
SCORES = ("top1", "prob")
COMMON_SEED = 0
DISTINCT_SEED = 100  # + panel position


def default_proxy() -> str:
    """The proxy the search uses by default (marked "default" in results.json), read from the
    search's own defaults so that the two cannot drift apart."""
    import inspect

    from swift_sampler.search.objective import InnerLoopSettings
    from swift_sampler.search.run import search

    s = InnerLoopSettings()
    common = inspect.signature(search).parameters["trial_seeds"].default == "common"
    loop = {"final": "finetune", "early": "early", "scratch": "scratch"}[s.start]
    return f"{loop}{'-crn' if common else ''}:{s.score}"


# -- the panel ---------------------------------------------------------------------------------
def build_panel(searched: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The fixed panel: name, kind, transform and the 10 parameters of each sampler.

    Shapes are in ``t`` with ``c = (1, 0)`` (the loss direction; ``t`` = cgf of the loss): a step
    keeps the crops below a cut, a ramp lowers tau with ``t``, an inverted shape keeps the
    high-loss crops. None reads ground truth or knows the noise rate.
    """
    def shape(name, kind, e, v, c1=1.0, c2=0.0, transform="cgf"):
        return {"name": name, "kind": kind, "transform": transform,
                "params": {"e1": e[0], "e2": e[1], "e3": e[2], **{f"v{i}": x for i, x in enumerate(v)},
                           "c1": c1, "c2": c2}}

    panel = [shape("uniform", "uniform", (0.25, 0.5, 0.75), (1, 1, 1, 1, 1), 0.0, 0.0)]
    for cut in (0.3, 0.5, 0.7):
        panel.append(shape(f"step-{cut:g}", "step", (cut, cut, 1.0), (1, 1, 0, 0, 0)))
    panel.append(shape("ramp-linear", "ramp", (0.25, 0.5, 0.75), (1, 0.75, 0.5, 0.25, 0)))
    panel.append(shape("ramp-soft", "ramp", (0.4, 0.6, 0.8), (1, 1, 0.55, 0.1, 0.1)))
    panel.append(shape("inverted-step-0.5", "inverted", (0.5, 0.5, 1.0), (0, 0, 1, 1, 1)))
    panel.append(shape("inverted-ramp", "inverted", (0.25, 0.5, 0.75), (0, 0.25, 0.5, 0.75, 1)))
    rng = np.random.default_rng(12)
    for k in range(1):
        z = rng.uniform(size=10)
        e = np.sort(z[:3])
        panel.append(shape(f"random-{k}", "random", tuple(e), tuple(z[3:8]), 2 * z[8] - 1, 2 * z[9] - 1))
    for method, params in searched.items():
        p = dict(params)
        transform = p.pop("transform")
        panel.append({"name": f"picked-{method}", "kind": "searched", "transform": transform,
                      "params": {k: float(v) for k, v in p.items()}})
    for item in panel:
        item["params"] = {k: float(v) for k, v in item["params"].items()}
    return panel


def select_panel(panel: list[dict[str, Any]], names: str | None, error) -> list[dict[str, Any]]:
    """The panel samplers named in ``names`` (all when None), uniform first whatever is named."""
    if not names:
        return panel
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = wanted - {p["name"] for p in panel}
    if unknown:
        error(f"unknown panel sampler(s) {', '.join(sorted(unknown))}; the panel has: "
              + ", ".join(p["name"] for p in panel))
    return [p for p in panel if p["name"] == "uniform" or p["name"] in wanted]


def searched_samplers(path: Path) -> dict[str, dict[str, Any]]:
    """The samplers the benchmark's searches picked (``results/noisy-cifar/results.json``)."""
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    out = {}
    for method in ("ss", "ss-cdf", "ss-random"):
        rows = (doc.get("methods", {}).get(method) or {}).get("per_seed") or []
        if rows and rows[0].get("sampler"):
            out[method] = rows[0]["sampler"]
    return out


def make_sampler(item: dict[str, Any], tables):
    from swift_sampler.pipeline.sampler.function import Sampler

    p = item["params"]
    return Sampler((0.0, p["e1"], p["e2"], p["e3"], 1.0), tuple(p[f"v{i}"] for i in range(5)),
                   p["c1"], p["c2"], item["transform"], tables)


# -- one unit of work --------------------------------------------------------------------------
class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        from benchlib.config import resolve_bench

        self.args = args
        self.out = Path(args.out)
        self.units = self.out / "units"
        self.units.mkdir(parents=True, exist_ok=True)
        self.config = resolve_bench(args.data, str(self.out), preset=args.preset, workers=args.workers,
                                    model=args.model, noise=args.noise, progress=False)
        self.store = self.out / "seed-0" / "noisy"

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def done(self, name: str) -> dict[str, Any] | None:
        path = self.units / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def unit(self, name: str, fn) -> dict[str, Any]:
        have = self.done(name)
        if have is not None:
            return have
        self.log(f"{name} ...")
        t0 = time.perf_counter()
        result = {"name": name, **fn(), "seconds": round(time.perf_counter() - t0, 1)}
        from swift_sampler.storage import atomic_write_json

        atomic_write_json(self.units / f"{name}.json", result)
        self.log(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'name'})}")
        return result

    # -- shared stages --------------------------------------------------------------------
    def prepare(self) -> None:
        from swift_sampler.pipeline.ingest.build import ingest
        from swift_sampler.storage import StoreLayout

        c = self.config
        if not StoreLayout(self.store).manifest.is_file():
            from benchlib.stores import source_spec

            ingest(source_spec(c.data), self.store, val_frac=c.val_frac, test_frac=c.test_frac,
                   noise=c.noise, seed=0, limit=c.limit, shard_size=c.shard_size, progress=False)
        self.unit("w_share", self._train_w_share)
        self._features()
        from swift_sampler.pipeline.sampler.table_store import load_tables

        self.tables = load_tables(self.store)

    def _recipe(self, name: str | None, seed: int, epochs: int | None = None, **extra):
        from swift_sampler.train.presets import resolve_config

        c = self.config
        # The benchmark's recipe (SeedRun.train), the same for every panel sampler.
        return resolve_config(str(self.store), preset=c.train_preset, name=name, model=c.model,
                              epochs=epochs or c.epochs, batch_size=c.batch_size, lr=c.lr, seed=seed,
                              workers=c.workers, progress=False, val_split="", **extra)

    def _train_w_share(self) -> dict[str, Any]:
        from swift_sampler.storage import StoreLayout
        from swift_sampler.train.checkpoint import load_checkpoint
        from swift_sampler.train.trainer import epoch_checkpoint, fit

        run = StoreLayout(self.store).run("uniform")
        ckpt = run / "checkpoint.pt"

        def keep(metrics):  # every epoch's checkpoint, for the early-checkpoint proxy
            epoch = int(load_checkpoint(ckpt)["epoch"])
            # The trainer's name for it, so `search run --start early` can use this w_share too.
            shutil.copyfile(ckpt, epoch_checkpoint(ckpt, epoch + 1))

        result = fit(self._recipe("uniform", 0, resume=True), on_epoch_end=keep)
        return {**self.scores(result.model), "epochs": self.config.epochs}

    def _features(self) -> None:
        from swift_sampler.pipeline.features.build import build_features
        from swift_sampler.storage import StoreLayout, sha256_file
        from swift_sampler.train.checkpoint import load_model
        from swift_sampler.train.distributed import pick_device

        layout = StoreLayout(self.store)
        ckpt = layout.run("uniform") / "checkpoint.pt"
        sha = sha256_file(ckpt)
        if layout.features_meta.is_file() and layout.tables_meta.is_file():
            meta = json.loads(layout.features_meta.read_text())
            if meta.get("done") and meta.get("checkpoint_sha256") == sha:
                return
        model, _ = load_model(ckpt, pick_device())
        self.log("features ...")
        build_features(self.store, model, crops_per_image=self.config.crops_per_image, seed=0,
                       checkpoint_sha256=sha, workers=self.config.workers, progress=False)

    def scores(self, model) -> dict[str, float]:
        """Noisy-val top-1 and mean probability of the val label; clean-test top-1."""
        import torch

        from swift_sampler.train.evaluate import predict

        out = {}
        for split in ("val", "test"):
            p = predict(self.store, model, split, workers=self.config.workers)
            probs = torch.softmax(torch.from_numpy(p["logits"]), 1).numpy()
            label = p["label"]
            out[f"{split}_top1"] = float((p["logits"].argmax(1) == label).mean())
            out[f"{split}_prob"] = float(probs[np.arange(len(label)), label].mean())
        return out

    def _hook(self, item, seed):
        from swift_sampler.train.sampling import create_sampler_hook

        return create_sampler_hook(self.store, make_sampler(item, self.tables), features="store", seed=seed,
                                   selection=self.args.selection)

    # -- the truth and the proxies --------------------------------------------------------
    def truth(self, item, seed: int) -> dict[str, Any]:
        from swift_sampler.train.trainer import fit

        def run():
            result = fit(self._recipe(f"truth-{item['name']}-s{seed}", seed, resume=True),
                         sampler=self._hook(item, seed))
            s = result.summary
            return {**self.scores(result.model), "kept_fraction": s.get("kept_fraction"),
                    "flipped_kept_share": s.get("flipped_kept_share"), "epochs": self.config.epochs}

        return self.unit(f"truth-{item['name']}-s{seed}", run)

    def proxy(self, proxy: str, item, seed: int) -> dict[str, Any]:
        return self.unit(f"{proxy}-{item['name']}-s{seed}", lambda: getattr(self, "_" + proxy.split("-")[0])(item, seed))

    def _finetune(self, item, seed):
        from swift_sampler.search.objective import InnerLoopObjective, InnerLoopSettings
        from swift_sampler.storage import StoreLayout

        c = self.config
        objective = InnerLoopObjective(self.store, StoreLayout(self.store).run("uniform") / "checkpoint.pt",
                                      InnerLoopSettings(epochs=c.finetune_epochs,
                                                       lr_fraction=c.finetune_lr_fraction,
                                                       selection=self.args.selection),
                                      workers=c.workers)
        model, info = objective.finetune(make_sampler(item, self.tables), seed)
        return {**self.scores(model), **info}

    def _early(self, item, seed):
        from swift_sampler.storage import StoreLayout
        from swift_sampler.train.trainer import epoch_checkpoint, fit

        c = self.config
        start = max(c.epochs - c.finetune_epochs, 1)
        src = StoreLayout(self.store).run("uniform")
        kept = epoch_checkpoint(src / "checkpoint.pt", start)
        if not kept.is_file():  # studies begun before the trainer's name was used
            kept = src / f"checkpoint-e{start:02d}.pt"
        # w_share's run continued with the sampler from that epoch on its own schedule, as the
        # search's early inner loop does (a resumed run of its own would have to keep its recipe).
        result = fit(self._recipe(None, seed, continue_from=str(kept), save_checkpoints=False),
                     sampler=self._hook(item, seed))
        s = result.summary
        return {**self.scores(result.model), "start_epoch": start, "epochs": c.epochs - start,
                "kept_fraction": s.get("kept_fraction"), "flipped_kept_share": s.get("flipped_kept_share")}

    def _scratch(self, item, seed):
        from swift_sampler.train.trainer import fit

        c = self.config
        result = fit(self._recipe(None, seed, epochs=c.finetune_epochs, save_checkpoints=False),
                     sampler=self._hook(item, seed))
        s = result.summary
        return {**self.scores(result.model), "epochs": c.finetune_epochs,
                "kept_fraction": s.get("kept_fraction"), "flipped_kept_share": s.get("flipped_kept_share")}


# -- the plan ----------------------------------------------------------------------------------
def run_study(study: Study, panel: list[dict[str, Any]], args) -> None:
    uniform = panel[0]
    parts = args.parts.split(",")
    for part in parts:
        if part == "truth0":
            for item in panel:
                study.truth(item, 0)
        elif part == "truth":
            for seed in range(1, args.truth_seeds):
                for item in panel:
                    study.truth(item, seed)
        elif part in PROXIES:
            for i, item in enumerate(panel):
                seed = DISTINCT_SEED + i if part == "finetune" else COMMON_SEED
                study.proxy(part, item, seed)
            for seed in range(args.noise_repeats):  # seed noise of the proxy
                study.proxy(part, uniform, seed)
        else:
            raise SystemExit(f"unknown part {part!r}")


# -- the report --------------------------------------------------------------------------------
def report(study: Study, panel: list[dict[str, Any]], args) -> dict[str, Any]:
    from scipy.stats import spearmanr

    names = [p["name"] for p in panel]
    sensible = np.array([p["kind"] != "inverted" for p in panel])
    truth_rows = []
    for p in panel:
        runs = [u for s in range(args.truth_seeds) if (u := study.done(f"truth-{p['name']}-s{s}"))]
        vals = [u["val_top1"] for u in runs]
        truth_rows.append({"name": p["name"], "seeds": len(runs),
                           "val_top1": float(np.mean(vals)) if vals else None,
                           "val_top1_per_seed": vals,
                           "test_top1": float(np.mean([u["test_top1"] for u in runs])) if runs else None,
                           "flipped_kept_share": _mean([u.get("flipped_kept_share") for u in runs])})
    truth = np.array([r["val_top1"] if r["val_top1"] is not None else np.nan for r in truth_rows])
    pairs = [[u["val_top1"] for s in range(args.truth_seeds)
              if (u := study.done(f"truth-{p['name']}-s{s}"))] for p in panel]
    pairs = [v for v in pairs if len(v) >= 2]
    truth_sd = float(np.sqrt(np.mean([np.var(v, ddof=1) for v in pairs]))) if pairs else None

    proxies = []
    for proxy in PROXIES:
        units = []
        for i, p in enumerate(panel):
            seed = DISTINCT_SEED + i if proxy == "finetune" else COMMON_SEED
            units.append(study.done(f"{proxy}-{p['name']}-s{seed}"))
        repeats = [u for s in range(args.noise_repeats) if (u := study.done(f"{proxy}-uniform-s{s}"))]
        epochs = next((u["epochs"] for u in units + repeats if u), None)
        for score in SCORES:
            x = np.array([u[f"val_{score}"] if u else np.nan for u in units])
            noise = [u[f"val_{score}"] for u in repeats]
            row = {"name": f"{proxy}:{score}", "proxy": proxy, "score": score,
                   "scores": [None if math.isnan(v) else float(v) for v in x],
                   "n": int(np.isfinite(x).sum()),
                   "spearman": _rho(x[sensible], truth[sensible], spearmanr),
                   "spearman_all": _rho(x, truth, spearmanr),
                   "truth_best_rank": _rank_of_best(x, truth),
                   "noise_sd": float(np.std(noise, ddof=1)) if len(noise) >= 2 else None,
                   "noise_repeats": len(noise),
                   "sensible_spread_sd": _sd(x[sensible]),
                   "epochs": epochs,
                   "default": f"{proxy}:{score}" == default_proxy()}
            row["signal_to_noise"] = (row["sensible_spread_sd"] / row["noise_sd"]
                                      if row["noise_sd"] and row["sensible_spread_sd"] else None)
            proxies.append(row)
    argv = [a for a in args.argv if a != "--report-only"]  # the command that ran the units
    doc = {"benchmark": "inner-loop", "selection": args.selection,
           "command": " ".join(["python", "bench/bench_inner_loop.py", *argv]),
           "config": study.config.to_json(), "truth_seeds": args.truth_seeds,
           "truth_seed_sd": truth_sd, "panel": panel, "truth": truth_rows, "proxies": proxies,
           "sensible": [n for n, s in zip(names, sensible) if s]}
    from benchlib.stores import write_json

    write_json(study.out / "results.json", doc)
    (study.out / "results.md").write_text(render(doc))
    return doc


def _mean(values):
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _sd(x):
    x = x[np.isfinite(x)]
    return float(np.std(x, ddof=1)) if len(x) >= 2 else None


def _rho(x, y, spearmanr):
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return None
    return float(spearmanr(x[ok], y[ok]).statistic)


def _rank_of_best(x, truth):
    """1-based rank, under the proxy, of the truth's best sampler (1: the proxy's top too)."""
    ok = np.isfinite(x) & np.isfinite(truth)
    if not ok.any():
        return None
    best = int(np.nanargmax(np.where(ok, truth, np.nan)))
    return 1 + int((x[ok] > x[best]).sum())


def render(doc: dict[str, Any]) -> str:
    c = doc["config"]

    def seeds_run(doc):
        low, high = (g(t["seeds"] for t in doc["truth"]) for g in (min, max))
        if low == high == doc["truth_seeds"]:
            return f"{high} seeds per sampler"
        return f"the seeds run so far ({low}-{high} of {doc['truth_seeds']} per sampler)"

    def f(v, d=2, pct=False):
        if v is None:
            return "–"
        return f"{100 * v:.{d}f}" if pct else f"{v:.{d}f}"

    lines = ["# Inner-loop study: which proxy ranks samplers as training from scratch does", "",
             f"Command: `{doc['command']}`", "",
             f"Store: preset `{c['preset']}` of `{Path(c['data']).name}` ({c['noise']}, {c['limit']} images), {c['model']}, "
             f"{c['epochs']} epochs at batch {c['batch_size']}, lr {c['lr']}; proxies use "
             f"E_f = {c['finetune_epochs']} epochs. Truth: each panel sampler trained from scratch, "
             f"val top-1 against the noisy val labels, mean over {seeds_run(doc)} "
             f"(seed-to-seed sd of one run: {f(doc['truth_seed_sd'], 2, True)} points). "
             "Spearman over the sensible part of the panel (inverted shapes left out) and over all of it.",
             "", "## Proxies", "",
             "| proxy | score | Spearman (sensible) | Spearman (all) | rank of truth's best | seed noise sd | spread sd (sensible) | signal/noise | epochs / trial | default |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in doc["proxies"]:
        scale = 100
        lines.append(f"| {p['proxy']} | {p['score']} | {f(p['spearman'])} | {f(p['spearman_all'])} | "
                     f"{p['truth_best_rank'] or '–'} | "
                     f"{f(p['noise_sd'] * scale if p['noise_sd'] is not None else None)} | "
                     f"{f(p['sensible_spread_sd'] * scale if p['sensible_spread_sd'] is not None else None)} | "
                     f"{f(p['signal_to_noise'], 1)} | {p['epochs'] or '–'} | {'yes' if p['default'] else ''} |")
    lines += ["", "Noise and spread in points (x100 of the score).", "", "## Panel and truth", "",
              "| sampler | kind | truth val top-1 | per seed | clean test top-1 (diagnostic) | flipped share kept (diagnostic) | "
              + " | ".join(p["name"] for p in doc["proxies"]) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(doc["proxies"])]
    for i, (item, t) in enumerate(zip(doc["panel"], doc["truth"])):
        per = ", ".join(f(v, 2, True) for v in t["val_top1_per_seed"]) or "–"
        cells = " | ".join(f(p["scores"][i], 2, True) for p in doc["proxies"])
        lines.append(f"| {item['name']} | {item['kind']} | {f(t['val_top1'], 2, True)} | {per} | "
                     f"{f(t['test_top1'], 2, True)} | {f(t['flipped_kept_share'], 3)} | {cells} |")
    lines += ["", "Panel parameters are in `results.json` (`panel`); `prob` scores are the mean "
              "predicted probability of the val label, x100.", ""]
    return "\n".join(lines)


def check_selection(out: Path, args: argparse.Namespace, error) -> None:
    """Units of one study share the keep rule: record it once, refuse another on resume. A
    study with sampler units and no record predates the setting and used ``es``."""
    path = out / "selection.json"
    if path.is_file():
        stored = json.loads(path.read_text())["selection"]
    elif (out / "units").is_dir() and any(u.name != "w_share.json" for u in (out / "units").iterdir()):
        stored = "es"  # w_share is trained without the stage: its unit says nothing
    else:
        stored = args.selection
    if stored != args.selection:
        if args.report_only:
            args.selection = stored
        else:
            error(f"{out} was run with --selection {stored}; pass --selection {stored} to resume "
                  "it, or another --out")
    path.write_text(json.dumps({"selection": stored}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/cifar10/train",
                    help="image folder (class sub-folders) or digits (default: %(default)s)")
    ap.add_argument("--out", default="results/inner-loop", help="results folder (default: %(default)s)")
    ap.add_argument("--preset", default="cpu-quick", help="noisy-CIFAR bench preset (default: %(default)s)")
    ap.add_argument("--searched", default="results/noisy-cifar/results.json",
                    help="benchmark results whose picked samplers join the panel (default: %(default)s)")
    ap.add_argument("--truth-seeds", type=int, default=2, help="from-scratch seeds per sampler (default: 2)")
    ap.add_argument("--noise-repeats", type=int, default=3,
                    help="uniform-sampler repeats per proxy for its seed noise (default: 3)")
    ap.add_argument("--parts", default="truth0," + ",".join(PROXIES) + ",truth",
                    help="what to run, in order (default: %(default)s)")
    ap.add_argument("--model", default=None, help="model (default: the preset's)")
    ap.add_argument("--noise", default=None,
                    help="label noise of the store (default: the preset's, symmetric:0.4); e.g. none")
    ap.add_argument("--panel", default=None, metavar="NAMES",
                    help="comma-separated panel samplers to keep (default: all 12); uniform is "
                    "always kept, and the panel is fixed once panel.json is written")
    ap.add_argument("--selection", default="systematic", choices=("systematic", "es"),
                    help="the sampler stage's keep rule for every unit (default: %(default)s); "
                    "fixed once the study has started (a study recorded without it used es)")
    ap.add_argument("--workers", type=int, default=2, help="loader workers (default: 2)")
    ap.add_argument("--report-only", action="store_true", help="re-render the report from finished units")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.truth_seeds < 1 or args.noise_repeats < 2:
        ap.error("--truth-seeds must be >= 1 and --noise-repeats >= 2")
    study = Study(args)
    panel_path = study.out / "panel.json"
    if panel_path.is_file():  # fixed once written: a resumed study trains the same samplers
        panel = json.loads(panel_path.read_text())
    else:
        panel = select_panel(build_panel(searched_samplers(Path(args.searched))), args.panel, ap.error)
        panel_path.parent.mkdir(parents=True, exist_ok=True)
        panel_path.write_text(json.dumps(panel, indent=1))
    check_selection(study.out, args, ap.error)
    if not args.report_only:
        study.prepare()
        run_study(study, panel, args)
    doc = report(study, panel, args)
    best = max((p for p in doc["proxies"] if p["spearman"] is not None), key=lambda p: p["spearman"],
               default=None)
    print(json.dumps({"benchmark": "inner-loop", "panel": len(panel),
                      "truth_runs": sum(t["seeds"] for t in doc["truth"]),
                      "best_proxy": best and best["name"], "best_spearman": best and best["spearman"],
                      "results": str(study.out / "results.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
