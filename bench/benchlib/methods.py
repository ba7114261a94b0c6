"""The methods of the benchmark, one function each: ``method(run: SeedRun) -> result dict``.

Every method trains the same model with the same recipe and epochs (``SeedRun.train``); what
differs is the data it trains on:

- ``uniform``: the noisy train split, uniform sampling (this run is also ``w_share``);
- ``uniform-early``: the same run stopped early, the checkpoint of its best noisy-val epoch
  (free: the uniform run keeps it; only with per-epoch curves);
- ``uniform-stage``: the uniform sampler (tau 1 for every crop) through the sampler stage
  (stored crops, 2 candidates per image, half kept): what every learned sampler starts from,
  so ``uniform-stage`` - ``uniform`` is the stage's own cost (a diagnostic);
- ``clean``: the clean-label twin (ground truth): the ceiling for any method;
- ``oracle-mask``: per-image weight 1 where the label is right, 0 where it was flipped (the
  oracle reads ground truth, which is what makes it an oracle), through the 2x
  oversample-and-filter stage: the ceiling for any sampler;
- ``small-loss``: weight 0 for the known noise rate's share of highest-loss images under
  ``w_share`` (loss of crop 0, the plain view, from the feature store), 1 for the rest;
- ``small-loss-gmm``: DivideMix's rule, no noise rate given: a two-component Gaussian mixture
  on the (min-max scaled) per-image loss under ``w_share``; weight 1 where the posterior of the
  low-loss component is above 0.5, else 0;
- ``gmm-dynamics``: the same rule on the loss averaged over ``w_share``'s epochs (its
  training dynamics, recorded by its own steps) instead of its final loss;
- ``co-teaching``: two networks, each updating on the small-loss part of the batch chosen by
  the other, forget rate ramped to the GMM's estimate (``benchlib.coteaching``);
  two networks: two runs of cost;
- ``cleanlab``: ``cleanlab.filter.find_label_issues`` on out-of-sample predicted probabilities
  from k-fold cross-validation (k models of this recipe, each trained on k-1 folds for the
  same number of passes over its data), flagged images weighted 0, retrained;
- ``ss`` (and the ablations ``ss-cdf``, ``ss-random``): see ``benchlib.ss``.

A result holds ``test_top1`` (clean test), ``val_top1`` (noisy val), ``seconds`` (this
method's own work), ``train_runs`` (its training cost in units of one full training run) and
method-specific diagnostics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from swift_sampler.storage import StoreLayout, read_view
from swift_sampler.storage.errors import UsageError

from .context import SeedRun
from .stores import ground_truth, known_noise_rate
from .weights import subset_hook, weights_hook


def _result(run: SeedRun, model, summary: dict[str, Any], *, components: tuple[str, ...],
            train_runs: float, **extra: Any) -> dict[str, Any]:
    return {**run.scores(model), "seconds": run.seconds(*components), "train_runs": train_runs,
            "kept_fraction": summary.get("kept_fraction"),
            "flipped_kept_share": summary.get("flipped_kept_share"), **extra}


def uniform(run: SeedRun) -> dict[str, Any]:
    model, summary = run.w_share()
    return _result(run, model, summary, components=("run:uniform",), train_runs=1.0)


def uniform_early(run: SeedRun) -> dict[str, Any]:
    """The uniform run's checkpoint of its best noisy-val epoch (early stopping)."""
    from swift_sampler.train.checkpoint import load_model
    from swift_sampler.train.distributed import pick_device

    _, summary = run.w_share()
    if not summary.get("best_checkpoint"):
        raise UsageError("the uniform run scored no val split per epoch, so it has no best "
                         "epoch; early stopping needs a preset with curves (e.g. cpu-converge)")
    with run.timed("score:uniform-early"):  # its own work: loading and scoring the checkpoint
        model, meta = load_model(summary["best_checkpoint"], pick_device())
        scores = run.scores(model)
    return {**scores, "seconds": run.seconds("score:uniform-early"), "train_runs": 1.0,
            "best_epoch": int(meta["epoch"]), "kept_fraction": None, "flipped_kept_share": None}


def uniform_stage(run: SeedRun) -> dict[str, Any]:
    from swift_sampler.pipeline.sampler.function import Sampler
    from swift_sampler.pipeline.sampler.table_store import load_tables
    from swift_sampler.train.sampling import create_sampler_hook

    run.ensure_features()
    flat = Sampler((0.0, 0.25, 0.5, 0.75, 1.0), (1.0,) * 5, 0.0, 0.0, "cgf", load_tables(run.noisy))
    hook = create_sampler_hook(run.noisy, flat, features="store", seed=run.seed,
                               describe={"method": "uniform-stage"}, selection=run.config.selection)
    model, summary = run.train("uniform-stage", hook=hook)
    return _result(run, model, summary, components=("run:uniform-stage",), train_runs=1.0)


def clean(run: SeedRun) -> dict[str, Any]:
    model, summary = run.train("clean", store=run.clean)
    return _result(run, model, summary, components=("run:clean",), train_runs=1.0)


def oracle_mask(run: SeedRun) -> dict[str, Any]:
    flipped = ground_truth(run.noisy)["noisy"]  # oracle: reads ground truth by design
    weights = (~flipped).astype(np.float64)
    hook = weights_hook(weights, describe={"method": "oracle-mask"},
                        selection=run.config.selection)
    model, summary = run.train("oracle-mask", hook=hook)
    return _result(run, model, summary, components=("run:oracle-mask",), train_runs=1.0,
                   dropped=int(flipped.sum()))


def crop0_loss(store) -> np.ndarray:
    """Loss of the plain view (crop 0) of every train image under ``w_share``, float64 ``(N,)``."""
    layout = StoreLayout(store)
    table = read_view(layout.root, "feature_parts", ["index", "loss"], where="crop = 0")
    index = table.column("index").to_numpy()
    loss = np.full(int(index.max()) + 1, np.nan)
    loss[index] = table.column("loss").to_numpy()
    if np.isnan(loss).any():
        raise UsageError(f"{layout.features_dir} lacks crop 0 of some images; rebuild the features")
    return loss


def small_loss_weights(loss: np.ndarray, rate: float) -> np.ndarray:
    """Weights ``(N,)``: 0 for the ``round(rate * N)`` highest losses (ties: lower index
    dropped first), 1 for the rest."""
    loss = np.asarray(loss, dtype=np.float64)
    if not 0.0 <= rate < 1.0:
        raise UsageError(f"noise rate must be in [0, 1), got {rate}")
    weights = np.ones(loss.size)
    drop = int(round(rate * loss.size))
    if drop:
        weights[np.argsort(-loss, kind="stable")[:drop]] = 0.0
    return weights


def small_loss(run: SeedRun) -> dict[str, Any]:
    run.ensure_features()
    rate = known_noise_rate(run.noisy)
    weights = small_loss_weights(crop0_loss(run.noisy), rate)
    drop = int((weights == 0).sum())
    hook = weights_hook(weights, describe={"method": "small-loss", "rate": rate},
                        selection=run.config.selection)
    model, summary = run.train("small-loss", hook=hook)
    flipped = ground_truth(run.noisy)["noisy"]  # diagnostics only
    return _result(run, model, summary, components=("run:small-loss",), train_runs=1.0,
                   rate=rate, dropped=drop, **_detection(weights == 0, flipped))


def gmm_clean_posterior(loss: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Posterior ``(N,)`` of the low-mean component of a 2-component GMM on the loss.

    As DivideMix (Li et al., 2020, §3.1): the loss is min-max scaled and fitted with
    scikit-learn's ``GaussianMixture`` (``max_iter=10, tol=1e-2, reg_covar=5e-4``).
    """
    from sklearn.mixture import GaussianMixture

    loss = np.asarray(loss, dtype=np.float64)
    span = loss.max() - loss.min()
    x = ((loss - loss.min()) / (span if span > 0 else 1.0)).reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4,
                          random_state=seed).fit(x)
    return gmm.predict_proba(x)[:, int(np.argmin(gmm.means_.ravel()))]


def gmm_filter(run: SeedRun, name: str, loss: np.ndarray) -> dict[str, Any]:
    """Train run ``name`` on the images the loss mixture (``gmm_clean_posterior``) calls clean."""
    weights = (gmm_clean_posterior(loss, seed=run.seed) > 0.5).astype(np.float64)
    if not weights.any():
        raise UsageError("the loss mixture put every image in the high-loss component; "
                         "w_share may not have trained")
    estimate = float(1.0 - weights.mean())
    hook = weights_hook(weights, describe={"method": name, "estimated_rate": estimate},
                        selection=run.config.selection)
    model, summary = run.train(name, hook=hook)
    flipped = ground_truth(run.noisy)["noisy"]  # diagnostics only
    return _result(run, model, summary, components=(f"run:{name}",), train_runs=1.0,
                   estimated_rate=estimate, dropped=int((weights == 0).sum()),
                   **_detection(weights == 0, flipped))


def small_loss_gmm(run: SeedRun) -> dict[str, Any]:
    run.ensure_features()
    return gmm_filter(run, "small-loss-gmm", crop0_loss(run.noisy))


def loss_mean(store) -> np.ndarray:
    """Loss of every train image averaged over the epochs of ``w_share``'s run (the store's
    ``dynamics``, recorded by its training steps), float64 ``(N,)``."""
    layout = StoreLayout(store)
    if not layout.dynamics.is_file():
        raise UsageError(f"{layout.root} holds no training dynamics; build the features from "
                         "a checkpoint of a run that recorded them")
    table = read_view(layout.root, "dynamics", ["index", "loss_mean"], order_by='"index"')
    return table.column("loss_mean").to_numpy(zero_copy_only=False).astype(np.float64)


def gmm_dynamics(run: SeedRun) -> dict[str, Any]:
    """``small-loss-gmm`` on the loss averaged over ``w_share``'s epochs instead of its final
    loss: a model that has fit the noise by its last epoch ranks it poorly by its final loss."""
    run.ensure_features()
    return gmm_filter(run, "gmm-dynamics", loss_mean(run.noisy))


def co_teaching(run: SeedRun) -> dict[str, Any]:
    from .coteaching import train_coteaching

    run.ensure_features()
    rate = float(1.0 - (gmm_clean_posterior(crop0_loss(run.noisy), seed=run.seed) > 0.5).mean())
    with run.timed("run:co-teaching"):
        out = train_coteaching(run.noisy, config=run.config, rate=min(rate, 0.9), seed=run.seed)
    return {**run.scores(out["model"]), "seconds": run.seconds("run:co-teaching"),
            "train_runs": 2.0, "estimated_rate": rate, "steps": out["steps"],
            "ramp_epochs": out["ramp_epochs"], "kept_fraction": out["kept_fraction"],
            "flipped_kept_share": None}


def cleanlab(run: SeedRun) -> dict[str, Any]:
    from cleanlab.filter import find_label_issues
    from sklearn.model_selection import StratifiedKFold

    from swift_sampler.train.evaluate import predict

    k = run.config.cleanlab_folds
    labels = ground_truth(run.noisy)["label"]  # the training labels (noisy), as a user has them
    n, classes = labels.size, int(labels.max()) + 1
    probs = np.full((n, classes), np.nan, dtype=np.float64)
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=run.seed)
    # Same recipe on k-1 folds: the same number of passes over the fold's images, so the
    # epochs (of N // B steps each) shrink by (k-1)/k.
    epochs = max(1, round(run.config.epochs * (k - 1) / k))
    components = []
    for f, (_, held) in enumerate(folds.split(np.zeros(n), labels)):
        keep = np.ones(n, dtype=bool)
        keep[held] = False
        name = f"cleanlab-fold{f}"
        model, _ = run.train(name, hook=subset_hook(keep, describe={"method": "cleanlab", "fold": f}),
                             epochs=epochs)
        with run.timed(f"predict:{name}"):
            logits = predict(run.noisy, model, "train", workers=run.config.workers)["logits"]
        components += [f"run:{name}", f"predict:{name}"]
        z = logits[held].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        probs[held] = p / p.sum(axis=1, keepdims=True)
    with run.timed("cleanlab:find_label_issues"):
        issues = find_label_issues(labels, probs, n_jobs=1)
    components.append("cleanlab:find_label_issues")
    hook = weights_hook((~issues).astype(np.float64), describe={"method": "cleanlab", "folds": k},
                        selection=run.config.selection)
    model, summary = run.train("cleanlab", hook=hook)
    components.append("run:cleanlab")
    flipped = ground_truth(run.noisy)["noisy"]  # diagnostics only
    return _result(run, model, summary, components=tuple(components),
                   train_runs=1.0 + k * epochs / run.config.epochs, folds=k, fold_epochs=epochs,
                   dropped=int(issues.sum()), **_detection(issues, flipped))


def _detection(dropped: np.ndarray, flipped: np.ndarray) -> dict[str, float | None]:
    """Diagnostics: how the dropped images match the flipped ones (precision, recall)."""
    hit = int((dropped & flipped).sum())
    return {"drop_precision": hit / int(dropped.sum()) if dropped.any() else None,
            "drop_recall": hit / int(flipped.sum()) if flipped.any() else None}


def ss_method(name: str):
    def method(run: SeedRun) -> dict[str, Any]:
        from .ss import swift_sampler

        return swift_sampler(run, name)

    method.__name__ = name.replace("-", "_")
    return method


METHOD_FUNCTIONS = {
    "uniform": uniform, "uniform-early": uniform_early, "uniform-stage": uniform_stage, "clean": clean, "oracle-mask": oracle_mask,
    "small-loss": small_loss, "small-loss-gmm": small_loss_gmm, "gmm-dynamics": gmm_dynamics, "co-teaching": co_teaching,
    "cleanlab": cleanlab, "ss": ss_method("ss"), "ss-cdf": ss_method("ss-cdf"),
    "ss-random": ss_method("ss-random"),
}
