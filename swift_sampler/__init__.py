"""Swift Sampler: learn a static data sampler by 10 parameters and train with it.

The whole method on scikit-learn's digits (40% of the labels flipped), as plain functions:

>>> import tempfile, swift_sampler as ss
>>> from swift_sampler.search import InnerLoopSettings, GuardSettings
>>> store = tempfile.mkdtemp() + "/digits"
>>> info = ss.ingest("digits", store, noise="symmetric:0.4", val_frac=0.2, test_frac=0.2,
...                  progress=False)
>>> w_share = ss.train_model(store, "w_share", epochs=4, workers=0, progress=False)["checkpoint"]
>>> feats = ss.build_features(store, w_share, crops_per_image=2, progress=False, device="cpu")
>>> found = ss.learn_sampler(store, w_share, steps=3, workers=0,
...                          finetune=InnerLoopSettings(epochs=1),
...                          guard=GuardSettings(candidates=1, repeats=2))
>>> found["choice"] in ("guard", "uniform")      # never worse than uniform by the noise
True
>>> found["model"] == (found["confirm"]["checkpoint"] if found["choice"] == "guard" else w_share)
True
>>> sampler = ss.load_sampler(found["best_sampler"])
>>> run = ss.train_model(store, "ss", sampler=sampler, epochs=4, workers=0, progress=False)
>>> 0 < ss.evaluate(store, run["checkpoint"], "test", workers=0)["top1"] <= 1
True
>>> ss.sql(store, "SELECT count(*) AS crops FROM features").to_pylist()
[{'crops': 2158}]

To use a learned sampler in your own loop: ``ss.sampler_weights(sampler_file, store)`` gives
per-image weights for ``torch.utils.data.WeightedRandomSampler`` and ``ss.keep_by_tau(...)``
is a WebDataset stage (``wds.WebDataset(urls).compose(stage)``) that draws twice and keeps
half by tau; ``ss.dropped(sampler_file, store)`` lists the images it drops or down-weights.
The same stages run from the command line as ``swift-sampler``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Where each public name lives. Loaded on first use (PEP 562), so that ``import
# swift_sampler.storage`` or the command line's ``--help`` does not import the whole API.
_EXPORTS = {
    "build_features": ".api", "dropped": ".api", "evaluate": ".api", "ingest": ".api",
    "learn_sampler": ".api", "load_sampler": ".api", "sql": ".api", "train_model": ".api",
    "Sampler": ".pipeline.sampler.function",
    "ImageWeights": ".pipeline.sampler.image_weights",
    "image_tau": ".pipeline.sampler.image_weights",
    "keep_by_tau": ".pipeline.sampler.image_weights",
    "sampler_weights": ".pipeline.sampler.image_weights",
}

__all__ = ["ImageWeights", "Sampler", "build_features", "dropped", "evaluate", "image_tau",
           "ingest", "keep_by_tau", "learn_sampler", "load_sampler", "sampler_weights", "sql",
           "train_model"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .api import (
        build_features,
        dropped,
        evaluate,
        ingest,
        learn_sampler,
        load_sampler,
        sql,
        train_model,
    )
    from .pipeline.sampler.function import Sampler
    from .pipeline.sampler.image_weights import (
        ImageWeights,
        image_tau,
        keep_by_tau,
        sampler_weights,
    )
