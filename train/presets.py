"""Training configuration: one frozen dataclass, named presets, and how they combine.

Resolution order (later wins): dataclass defaults < preset < explicit overrides. The resolved
configuration is what ``config.json`` in the run folder records (as timm writes ``args.yaml``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from swift_sampler.storage.arguments import check_fields
from swift_sampler.storage.errors import UsageError

from .schedules import SCHEDULES


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on.

    ``name=None`` trains without writing anything (in-process use, e.g. a search trial);
    otherwise the run folder is ``STORE/runs/NAME``.
    """

    store: str
    name: str | None = None
    preset: str | None = None
    model: str = "tiny-cnn"
    # torchvision:<arch> only: start from torchvision's default weights (a new head).
    pretrained: bool = False
    epochs: int = 15
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "one-cycle"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    workers: int = 2
    shuffle_buffer: int = 2000
    # Training crops (pipeline.features.crops.AUGMENTATIONS): pad-and-crop (random-resized for
    # large images) with a horizontal flip, either alone, or the plain view.
    augment: str = "crop-flip"
    image_size: int | None = None
    val_split: str | None = "val"  # None or a missing split: no per-epoch validation
    # A split scored every epoch for the record only (``test_accuracy`` ... in metrics.jsonl),
    # e.g. a clean test split to see when a run starts to fit noisy labels; nothing is chosen
    # on it. None: none.
    diagnostic_split: str | None = None
    # Keep ``checkpoint-best.pt``, the checkpoint of the epoch of highest val top-1 (early
    # stopping on val, as timm's ``model_best``); needs ``val_split``.
    keep_best: bool = True
    # Per-image statistics over the epochs (train.dynamics), kept with the checkpoint and
    # written to ``dynamics.parquet`` in the run folder; named runs only.
    record_dynamics: bool = True
    init: str | None = None
    # A checkpoint of a run to continue: weights, optimiser state and epoch are restored and
    # training goes on from the next epoch to ``epochs`` on this config's schedule (the
    # early-checkpoint inner loop: w_share's own run resumed with a sampler). No run folder.
    continue_from: str | None = None
    resume: bool = False
    device: str | None = None  # None: cuda when present, else cpu
    amp: bool | None = None  # None: bf16 autocast on cuda only
    channels_last: bool = True
    save_checkpoints: bool = True
    # A damaged shard stops the run (naming it and the samples lost) unless this is set; then
    # it is skipped and the summary's ``skipped`` counts the samples lost.
    skip_damaged: bool = False
    # Copies of the checkpoints of the last epochs before the end (``checkpoint-eNNN.pt``, NNN
    # = epochs done), kept for the early-checkpoint inner loop; 0 keeps none.
    keep_checkpoints: int = 5
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # recorded, not interpreted (e.g. sampler)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's CIFAR recipe (section 4.1): ResNet-18, SGD Nesterov, momentum 0.9, lr 0.1,
    # batch 128, weight decay 1e-3, 80 epochs, x0.1 at epoch 40. Meant for a GPU.
    "paper-cifar": dict(model="resnet18", epochs=80, batch_size=128, lr=0.1, momentum=0.9,
                        nesterov=True, weight_decay=1e-3, schedule="multistep",
                        milestones=(40,), gamma=0.1),
    # A CPU budget: the 0.39M-parameter tiny-cnn with a one-cycle schedule, ~15 epochs.
    "cpu-quick": dict(model="tiny-cnn", epochs=15, batch_size=256, lr=0.2, momentum=0.9,
                      nesterov=True, weight_decay=5e-4, schedule="one-cycle"),
    # Training to convergence on a CPU, where uniform training fits noisy labels (the regime of
    # the paper's Table 1): cnn-fc (2.5M parameters), SGD Nesterov, a 2-epoch warm-up to lr 0.05,
    # x0.1 at epochs 20 and 30 of 40, random horizontal flips. With pad-and-crop as well, 40 or
    # 60 epochs on 5,000 noisy CIFAR images never reached the noise (results/converge-recipe).
    "cpu-converge": dict(model="cnn-fc", epochs=40, batch_size=128, lr=0.05, momentum=0.9,
                         nesterov=True, weight_decay=5e-4, schedule="multistep",
                         milestones=(20, 30), gamma=0.1, warmup=2.0, augment="flip"),
    # 8x8 digits in seconds.
    "digits": dict(model="digits-net", epochs=12, batch_size=32, lr=0.1, momentum=0.9,
                   nesterov=True, weight_decay=5e-4, schedule="one-cycle", shuffle_buffer=500),
}


def default_preset(image_side: int | None, has_cuda: bool) -> str:
    """The preset a run gets when none is named: digits for tiny images, else by hardware."""
    if image_side is not None and image_side <= 16:
        return "digits"
    return "paper-cifar" if has_cuda else "cpu-quick"


def preset_for_store(manifest: dict[str, Any], has_cuda: bool) -> str:
    """``default_preset`` for a store's images (its manifest's smaller image side)."""
    image = manifest.get("image", {})
    side = min(image["height"], image["width"]) if image.get("height") else None
    return default_preset(side, has_cuda)


def resolve_config(store: str, *, preset: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < ``PRESETS[preset]`` < ``overrides`` (``None`` values do not override).

    Raises:
        ValueError: unknown preset, schedule or field, or a value out of range.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise UsageError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    check_fields(TrainConfig, overrides, where="training")
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "milestones" in values:
        values["milestones"] = tuple(int(m) for m in values["milestones"])
    config = TrainConfig(store=str(store), preset=preset, **values)
    validate(config)
    return config


def validate(c: TrainConfig) -> None:
    if c.epochs < 1:
        raise UsageError(f"epochs must be >= 1, got {c.epochs}")
    if c.batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {c.batch_size}")
    if not c.lr > 0:
        raise UsageError(f"lr must be positive, got {c.lr}")
    if c.weight_decay < 0 or not 0 <= c.momentum < 1:
        raise UsageError("weight decay must be >= 0 and momentum in [0, 1)")
    if c.schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {c.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if c.val_split and c.val_split not in ("train", "val", "test"):
        raise UsageError(f"unknown --val-split {c.val_split!r}; choose val, test or train "
                         "(or an empty string for no per-epoch validation)")
    if c.diagnostic_split and c.diagnostic_split not in ("train", "val", "test"):
        raise UsageError(f"unknown --diagnostic-split {c.diagnostic_split!r}; choose val, test or "
                         "train (or leave it out)")
    if c.diagnostic_split and c.diagnostic_split == c.val_split:
        raise UsageError(f"--diagnostic-split {c.diagnostic_split} is already the validation "
                         "split; choose another split or leave it out")
    from swift_sampler.pipeline.features.crops import AUGMENTATIONS

    if c.augment not in AUGMENTATIONS:
        raise UsageError(f"unknown --augment {c.augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if c.keep_checkpoints < 0:
        raise UsageError(f"keep_checkpoints must be >= 0, got {c.keep_checkpoints}")
    if c.continue_from and (c.init or c.resume):
        raise UsageError("continue_from cannot be combined with init or resume")
    if c.workers < 0:
        raise UsageError(f"workers must be >= 0, got {c.workers}")
