"""Settings of the noisy-CIFAR benchmark: one frozen dataclass, named presets, the methods.

Resolution order (later wins): dataclass defaults < preset < explicit options, as for training.
The sizes of ``cpu-quick`` were chosen from a timing run on a two-core machine so that the
default methods finish within an hour; README/results.md state them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swift_sampler.pipeline.ingest.noise import parse_noise
from swift_sampler.pipeline.sampler.pair import DEFAULT_PAIR, FeaturePair
from swift_sampler.storage.errors import UsageError

# Order of the results table. ``ss-cdf`` and ``ss-random`` are the paper's ablations (Fig. 3).
# ``small-loss`` is told the true noise rate (a reference no user has); ``small-loss-gmm``
# estimates it, as DivideMix does.
# ``uniform-stage`` (the uniform sampler through the sampler stage) measures what the stage
# itself costs against ``uniform``: every filtering method starts from it.
# ``uniform-early`` is the uniform run stopped early on the noisy val split (its checkpoint of
# the best val epoch): free, and what most practitioners do against noisy labels.
METHODS = ("uniform", "uniform-early", "uniform-stage", "clean", "oracle-mask", "small-loss",
           "small-loss-gmm", "gmm-dynamics", "co-teaching", "cleanlab", "ss", "ss-cdf",
           "ss-random")
DEFAULT_METHODS = ("uniform", "clean", "oracle-mask", "small-loss", "small-loss-gmm", "co-teaching",
                   "cleanlab", "ss")
# Searches behind the ss methods: (search name, agent, transform).
SEARCHES = {"ss": ("ss", "gp-ucb", "cgf"), "ss-cdf": ("ss-cdf", "gp-ucb", "cdf"),
            "ss-random": ("ss-random", "random", "cgf")}
# Settings only the searches depend on. Changing them re-runs the ss methods alone: the other
# methods' results stay valid, and each fine-tune recipe gets its own search folder.
SEARCH_KEYS = ("steps", "finetune_epochs", "finetune_lr_fraction", "finetune_repeats", "trial_seeds",
               "inner_start", "inner_score", "guard", "guard_candidates", "guard_repeats", "confirm",
               "sampler_features", "guard_inner_loop", "features_pair")
# What the search did before a setting existed: a stored result that lacks the key was made
# this way (no guard, no noise trials, distinct seeds, fine-tune from w_share's end, top-1).
LEGACY_SEARCH = {"trial_seeds": "distinct", "inner_start": "final", "inner_score": "top1",
                 "guard": False, "guard_candidates": 2, "guard_repeats": 0, "confirm": False,
                 "sampler_features": "store", "guard_inner_loop": "search"}
# Likewise for the training settings: results stored without ``selection`` were made with es.
LEGACY_TRAINING = {"selection": "es", "curves": False}


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark run depends on (written to ``OUT/bench.json``).

    Data: ``limit`` images of the source, split per class into ``val_frac`` / ``test_frac`` /
    the rest for train; noise on train and val only; the test split stays clean.
    Training: every method trains ``model`` for ``epochs`` epochs of ``N_train // batch_size``
    steps with the ``train_preset`` recipe (same lr, schedule, batch size).
    Search: ``steps`` trials (E_o) of ``finetune_epochs`` (E_f) fine-tune epochs each, features
    from ``crops_per_image`` crops. cleanlab: ``cleanlab_folds``-fold cross-validation.
    """

    data: str
    out: str
    preset: str = "cpu-quick"
    noise: str = "symmetric:0.4"
    # A label file (``ingest --labels``: CSV/Parquet path,label, e.g. CIFAR-10N) for train and
    # val instead of injected noise; then ``noise`` is "none". The test split stays clean.
    labels: str | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: int = 1
    verify_ranks: int = 0
    train_preset: str = "cpu-quick"
    model: str = "tiny-cnn"
    limit: int | None = 35000
    val_frac: float = 5 / 35
    test_frac: float = 10 / 35
    epochs: int = 12
    batch_size: int = 128
    lr: float = 0.1
    steps: int = 18
    # E_f and the fine-tune peak lr as a fraction of the recipe's. Two epochs at the full lr
    # knock w_share off its minimum and the scores mostly measure that; two epochs at 0.25x
    # barely move it: on noisy CIFAR (seed 0) that search picked a sampler whose from-scratch
    # *val* top-1 fell below uniform's (38.9 vs 42.7). Three epochs at 0.5x picked one above it
    # (44.8), so cpu-quick uses 3 x 0.5 (chosen on val scores only).
    finetune_epochs: int = 3
    finetune_lr_fraction: float = 0.5
    # Fine-tunes per trial (different seeds), scores averaged: the objective's seed noise falls
    # by sqrt(repeats) at repeats x the search cost.
    finetune_repeats: int = 1
    # The inner loop (search.objective.InnerLoopSettings ``start``/``score``), its trial seeds,
    # and the no-harm guard (search.loop.GuardSettings); see results/inner-loop/.
    trial_seeds: str = "common"
    inner_start: str = "scratch"
    inner_score: str = "top1"
    guard: bool = True
    guard_candidates: int = 2
    guard_repeats: int = 2
    # The guard's inner loop (GuardSettings.inner_loop): a start of its own, "early" (w_share's run
    # resumed for its last epochs), or "search" (the search's). The search folder's name leaves it
    # out: a finished search is guarded again. With image features, the early guard's picks beat
    # the search-loop guard's on val at 40% noise (results/README.md).
    guard_inner_loop: str = "early"
    # After the retraining: keep the learned sampler only if its full from-scratch run beats
    # w_share (the uniform run of the same recipe and seed) on val; else the user gets w_share.
    # The 3-epoch inner loop favours easy crops on clean data, which a full run does not.
    confirm: bool = True
    # Where the ss methods' sampler stage (search trials and retraining) finds tau: "image"
    # (fresh crops, the image's mean stored tau) or "store" (stored crops, per-crop tau).
    sampler_features: str = "image"
    # The two features the ss methods' sampler combines, "F1,F2" with an optional ":class" for
    # a per-class cdf (``pipeline.sampler.pair``); the store's tables are built for it. The
    # default is the paper's pair, final loss and E^r of w_share.
    features_pair: str = "loss,entropy_r"
    # The sampler stage's keep rule (train.sampling) for every method that filters: systematic
    # draws an image's two candidates together, so a flat weight shows every image once an epoch.
    selection: str = "systematic"
    crops_per_image: int = 4
    # The uniform and clean runs score the noisy val split and the clean test split after every
    # epoch (per-epoch curves; the best val epoch is ``uniform-early``). Other runs score once.
    curves: bool = False
    cleanlab_folds: int = 3
    workers: int = 2
    shard_size: int = 5000
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["methods"] = list(self.methods)
        return d

    def definition(self) -> dict[str, Any]:
        """The settings that define the results (a resumed run must match them)."""
        d = self.to_json()
        for key in ("out", "methods", "seeds", "verify_ranks", "workers", "progress"):
            d.pop(key)
        return d

    def search_settings(self) -> dict[str, Any]:
        """The part of ``definition()`` that only the ss methods depend on."""
        return {k: getattr(self, k) for k in SEARCH_KEYS}

    @staticmethod
    def with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
        """Stored settings with the fields they predate filled in by their defaults (a field
        is only ever added with a default that reproduces the behaviour before it)."""
        defaults = {f.name: f.default for f in dataclasses.fields(BenchConfig)
                    if f.default is not dataclasses.MISSING}
        return {**{k: defaults[k] for k in SEARCH_KEYS}, **LEGACY_SEARCH, **stored}

    @staticmethod
    def definition_with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
        """A stored ``definition()`` with the search and training fields it predates filled in."""
        return {**LEGACY_TRAINING, **BenchConfig.with_defaults(stored)}

    def pair(self) -> FeaturePair:
        """``features_pair`` parsed ("F1,F2" or "F1,F2:class")."""
        features, _, cdf_by = self.features_pair.partition(":")
        return FeaturePair.parse(features, cdf_by or "global")

    def _pair_suffix(self) -> str:
        pair = self.pair()
        if pair == DEFAULT_PAIR:
            return ""
        return "-" + ".".join(pair.features) + ("-byclass" if pair.cdf_by == "class" else "")

    def search_name(self, method: str) -> str:
        """Search folder of an ss method, named by its fine-tune recipe (``ss-e3-lr0.5``).

        The trial count is left out: a search with more steps extends the same folder; repeats
        show as ``-r2`` when there is more than one.
        """
        repeats = f"-r{self.finetune_repeats}" if self.finetune_repeats > 1 else ""
        inner = "".join([f"-{self.inner_start}" if self.inner_start != "final" else "",
                         f"-{self.inner_score}" if self.inner_score != "top1" else "",
                         "-crn" if self.trial_seeds == "common" else "",
                         f"-g{self.guard_candidates}x{self.guard_repeats}" if self.guard else
                         (f"-n{self.guard_repeats}" if self.guard_repeats else ""),
                         f"-{self.sampler_features}" if self.sampler_features != "store" else "",
                         self._pair_suffix()])
        return (f"{SEARCHES[method][0]}-e{self.finetune_epochs}-lr{self.finetune_lr_fraction:g}"
                f"{repeats}{inner}")


PRESETS: dict[str, dict[str, Any]] = {
    # tiny-cnn on 20,000 noisy train / 5,000 noisy val / 10,000 clean test images, 12 epochs
    # one-cycle at batch 128; sizes and timings in the module
    # docstring of benchlib.
    # 10 search trials + uniform on 2 more seeds (the noise) + the early guard's uniform and 2
    # candidates on those 2 seeds: 18 trials of 3 epochs = 4.5 runs, 5.5 with the retraining.
    # (A 10-trial search is the first 10 trials of a 12-trial one: same Sobol' points and seeds.)
    "cpu-quick": dict(train_preset="cpu-quick", model="tiny-cnn", limit=35000, val_frac=5 / 35,
                      test_frac=10 / 35, epochs=12, batch_size=128, lr=0.1, steps=10,
                      finetune_epochs=3, finetune_lr_fraction=0.5, crops_per_image=4,
                      cleanlab_folds=3),
    # Training to convergence, where uniform training memorises the noise (as in the paper's
    # Table 1): cnn-fc on 5,000 noisy train / 5,000 noisy val / 10,000 clean test images, 40
    # epochs of the cpu-converge train preset (step decay, flips; results/converge-recipe).
    # The sampler combines the loss averaged over w_share's run and its final loss: with the
    # paper's pair (final loss, E^r) of a model that has fit the noise, no search trial beat
    # uniform on val (best 26.30 vs 25.94); with this pair the search's pick made 36.08 on val
    # against w_share's 26.84 (seed 0, results/README.md). No guard: its 2-seed check of the
    # 3-epoch trials could not tell that pick from uniform on seed 1 (gain 0.98, margin 3.97),
    # where the full-run check, which decides alone then, kept it on val (36.90 vs 28.54).
    "cpu-converge": dict(train_preset="cpu-converge", model="cnn-fc", limit=20000,
                         val_frac=0.25, test_frac=0.5, epochs=40, batch_size=128, lr=0.05,
                         steps=10, finetune_epochs=3, finetune_lr_fraction=0.5,
                         features_pair="loss_mean,loss", guard=False, guard_inner_loop="search",
                         crops_per_image=4, cleanlab_folds=3, curves=True),
    # The paper's CIFAR recipe (§4.1) on the full shared set: ResNet-18, 80 epochs, lr 0.1 x0.1
    # at epoch 40, batch 128, wd 1e-3; E_o = 40, E_f = 5 (§4). 35,000 / 5,000 / 10,000. GPU.
    "paper": dict(train_preset="paper-cifar", model="resnet18", limit=None, val_frac=0.1,
                  test_frac=0.2, epochs=80, batch_size=128, lr=0.1, steps=40, finetune_epochs=5,
                  finetune_lr_fraction=1.0,
                  crops_per_image=8, cleanlab_folds=5, workers=8),
    # Seconds-scale smoke run (tests): 300 images, 2 epochs, 2 trials, 2 folds.
    # Two epochs, so that every inner loop runs (the early one needs a checkpoint before the end).
    "tiny": dict(train_preset="cpu-quick", model="tiny-cnn", limit=300, val_frac=0.2,
                 test_frac=0.2, epochs=2, batch_size=32, lr=0.05, steps=2, finetune_epochs=1,
                 guard_candidates=1, curves=True,
                 crops_per_image=2, cleanlab_folds=2, workers=0, shard_size=100),
}


def resolve_bench(data: str, out: str, *, preset: str = "cpu-quick", **options: Any) -> BenchConfig:
    """Defaults < ``PRESETS[preset]`` < ``options`` (``None`` values do not override).

    Raises:
        ValueError: unknown preset, method or option; a value out of range.
    """
    if preset not in PRESETS:
        raise UsageError(f"unknown bench preset {preset!r}; choose one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    unknown = set(options) - fields
    if unknown:
        raise UsageError(f"unknown bench option(s): {', '.join(sorted(unknown))}")
    values = {**PRESETS[preset], **{k: v for k, v in options.items() if v is not None}}
    if Path(data).is_dir():  # one spelling per folder, so a resumed run matches bench.json
        data = str(Path(data).resolve())
    if values.get("labels"):
        values["labels"] = str(Path(values["labels"]).resolve())
        if "noise" in options and options["noise"] not in (None, "none"):
            raise UsageError(f"--labels gives the noisy labels; drop --noise {options['noise']}")
        values["noise"] = "none"
    if isinstance(values.get("methods"), str):
        values["methods"] = parse_methods(values["methods"])
    config = BenchConfig(data=str(data), out=str(out), preset=preset, **values)
    check(config)
    return config


def parse_methods(text: str) -> tuple[str, ...]:
    """``"uniform,ss"`` -> ("uniform", "ss") in table order; ``all`` means every method."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if names == ["all"]:
        return METHODS
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise UsageError(f"unknown method(s) {', '.join(bad) or '(none given)'}; choose from "
                         f"{', '.join(METHODS)} (comma-separated) or all")
    return tuple(m for m in METHODS if m in names)


def check(c: BenchConfig) -> None:
    parse_noise(c.noise)
    for name in ("seeds", "epochs", "batch_size", "steps", "finetune_epochs", "finetune_repeats",
                 "crops_per_image"):
        if int(getattr(c, name)) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
    if c.cleanlab_folds < 2:
        raise UsageError(f"cleanlab needs at least 2 folds, got {c.cleanlab_folds}")
    if c.verify_ranks < 0 or c.verify_ranks == 1:
        raise UsageError(f"--verify-ranks must be 0 or >= 2 (a rank correlation needs two "
                         f"samplers), got {c.verify_ranks}")
    if c.verify_ranks and c.verify_ranks > c.steps:
        raise UsageError(f"--verify-ranks {c.verify_ranks} exceeds the {c.steps} search trials")
    if c.verify_ranks and "ss" not in c.methods:
        raise UsageError("--verify-ranks retrains samplers of the ss search; add ss to --methods")
    if c.limit is not None and c.limit < 1:
        raise UsageError(f"--limit must be positive, got {c.limit}")
    for name, frac in (("val-frac", c.val_frac), ("test-frac", c.test_frac)):
        if not 0 < frac < 1:
            raise UsageError(f"--{name} must lie in (0, 1), got {frac:g}")
    if c.val_frac + c.test_frac >= 1:
        raise UsageError(f"--val-frac + --test-frac = {c.val_frac + c.test_frac:g} leaves no "
                         f"training images; lower them")
    if not c.lr > 0:
        raise UsageError(f"--lr must be positive, got {c.lr}")
    from swift_sampler.search.loop import TRIAL_SEEDS, GuardSettings
    from swift_sampler.search.objective import SCORES, STARTS

    for name, value, allowed in (("trial-seeds", c.trial_seeds, TRIAL_SEEDS),
                                 ("inner-start", c.inner_start, STARTS),
                                 ("inner-score", c.inner_score, SCORES)):
        if value not in allowed:
            raise UsageError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
    GuardSettings(enabled=c.guard, candidates=c.guard_candidates, repeats=c.guard_repeats,
                  inner_loop=c.guard_inner_loop).check()
    from swift_sampler.pipeline.sampler.filter import SELECTIONS

    if c.sampler_features not in ("store", "image"):
        raise UsageError(f"--sampler-features must be store or image, got {c.sampler_features!r}")
    c.pair()  # names the unknown feature or the malformed pair
    if c.selection not in SELECTIONS:
        raise UsageError(f"--selection must be one of {', '.join(SELECTIONS)}, got {c.selection!r}")
    if not 0 < c.finetune_lr_fraction <= 10:
        raise UsageError(f"--finetune-lr-fraction must be in (0, 10], got {c.finetune_lr_fraction}")


def planned_work(c: BenchConfig, counts: dict[str, int]) -> dict[str, dict[str, float]]:
    """Images each method pushes through the model for one seed, from the settings alone.

    Returns ``{method: {"train": image-steps, "forward": images scored without a step}}``;
    ``features`` (scoring K crops per image) is listed once, as small-loss and the ss methods
    share it. Evaluations (val + test per method) count as forward passes. Divided by measured
    images/s this is the time estimate the runner prints before it starts.
    """
    n, val, test = counts["train"], counts["val"], counts["test"]
    run = c.epochs * n
    fold_epochs = max(1, round(c.epochs * (c.cleanlab_folds - 1) / c.cleanlab_folds))
    work = {m: {"train": float(run), "forward": float(val + test)} for m in c.methods}
    if "uniform-early" in work:  # the uniform run's own checkpoint: scoring only
        work["uniform-early"]["train"] = 0.0
        if "uniform" not in work:
            work["uniform"] = {"train": float(run), "forward": 0.0}
    if c.curves:
        for m in ("uniform", "clean"):
            if m in work:
                work[m]["forward"] += c.epochs * (val + test)
    if "co-teaching" in work:  # two networks, each the steps of one run
        work["co-teaching"]["train"] = 2.0 * run
    if "cleanlab" in work:
        work["cleanlab"]["train"] += c.cleanlab_folds * fold_epochs * n
        work["cleanlab"]["forward"] += c.cleanlab_folds * n
    own = c.guard_inner_loop != "search"  # the guard then evaluates the uniform sampler too
    trials = c.steps + c.guard_repeats + ((c.guard_candidates + own) * c.guard_repeats if c.guard else 0)
    for m in SEARCHES:
        if m in work:
            work[m]["train"] += trials * c.finetune_epochs * c.finetune_repeats * n
            work[m]["forward"] += trials * c.finetune_repeats * val
    if work.keys() & {"small-loss", "small-loss-gmm", "gmm-dynamics", "co-teaching", *SEARCHES}:
        work["features"] = {"train": 0.0, "forward": float(c.crops_per_image * n)}
        if "uniform" not in work:  # w_share is trained anyway
            work["uniform"] = {"train": float(run), "forward": 0.0}
    if c.verify_ranks:
        work["verify-ranks"] = {"train": float(c.verify_ranks * run), "forward": float(c.verify_ranks * val)}
    return work
