"""Classifiers with one interface: uint8 crops in, logits out, penultimate features exposed.

Every model built by ``create_model``:
- takes a batch ``(B, C, H, W)`` of uint8 pixels (as ``pipeline.features.crops.apply_crop`` returns
  them) or floats in [0, 1]; scaling and mean/std normalisation happen inside the model, so
  the loader, build-features and the sampler stage never normalise anything;
- exposes ``features(x) -> (B, D)`` and ``head`` (``nn.Linear(D, C)``) with
  ``model(x) == model.head(model.features(x))``: feature extraction needs both;
- records ``model_name``, ``num_classes``, ``in_chans`` and ``image_size`` so a checkpoint can
  rebuild it (``train.checkpoint``).

Names: ``resnet18`` (CIFAR form: 3x3 stem, stride 1, no max-pool; He et al. 2016, as used in
the paper's CIFAR experiments), ``tiny-cnn`` (a 0.39M-parameter conv net fast enough for CPU
work), ``cnn-fc`` (tiny-cnn with a wide fully connected layer, 2.5M parameters: memorises noisy
labels in a long run), ``digits-net`` (8x8 grayscale digits), ``torchvision:<arch>`` (any torchvision
classifier, e.g. ``torchvision:resnet50``, randomly initialised or, with ``pretrained``, from
torchvision's default weights).

``as_classifier`` brings a model built elsewhere (a torchvision or timm network, your own
``nn.Module``) to the same interface, for scoring a store and evaluating.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from swift_sampler.storage.errors import SwiftSamplerError, UsageError

MODEL_NAMES = ("resnet18", "tiny-cnn", "cnn-fc", "digits-net", "torchvision:<arch>")
# ImageNet statistics for colour images (what torchvision weights expect); a neutral guess for
# grayscale. BatchNorm right after the first conv makes the exact values unimportant.
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.5,), (0.25,)


class UnknownModelError(SwiftSamplerError, ValueError):
    """The model name is not one ``create_model`` knows."""


class Classifier(nn.Module):
    """``backbone`` (normalised input -> (B, D)) followed by a linear ``head`` (D -> C).

    Normalisation is one fused multiply-add: ``x * scale + shift`` with
    ``scale = 1 / (255 * std)`` and ``shift = -mean / std`` for uint8 input
    (``1 / std`` for float input in [0, 1]).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, *, name: str, num_classes: int,
                 in_chans: int, image_size: int, mean: Sequence[float], std: Sequence[float],
                 expand_gray: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.model_name = name
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.image_size = image_size
        self.expand_gray = expand_gray  # torchvision stems expect 3 channels
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("inv_std", 1.0 / std_t)
        self.register_buffer("shift", -mean_t / std_t)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() * (self.inv_std / 255.0) + self.shift
        else:
            x = x.float() * self.inv_std + self.shift
        if self.expand_gray and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, float ``(B, D)``."""
        return self.backbone(self.normalise(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for uint8 or [0, 1] float images ``(B, C, H, W)``."""
        return self.head(self.features(x))


def _conv_bn(cin: int, cout: int, pool: bool = False) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers


def _tiny_cnn(in_chans: int) -> tuple[nn.Module, int]:
    # 32-64-128-256 with BN/ReLU/max-pool (0.39M parameters): about 1,100-1,300 train
    # images/s channels-last on two cores at 32x32, batch 256.
    body = nn.Sequential(
        *_conv_bn(in_chans, 32, pool=True),
        *_conv_bn(32, 64, pool=True),
        *_conv_bn(64, 128, pool=True),
        *_conv_bn(128, 256, pool=True),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
    )
    return body, 256


def _cnn_fc(in_chans: int, image_size: int) -> tuple[nn.Module, int]:
    # tiny-cnn's four conv stages, the last without pooling, then a 512-wide fully connected
    # layer on the flattened map (2.5M parameters at 32x32, most of them in that layer): near
    # tiny-cnn's speed on a CPU, with the capacity to fit noisy labels in a long run as large
    # networks do (the ``cpu-converge`` preset; results/converge-recipe).
    side = image_size // 8
    body = nn.Sequential(
        *_conv_bn(in_chans, 32, pool=True),
        *_conv_bn(32, 64, pool=True),
        *_conv_bn(64, 128, pool=True),
        *_conv_bn(128, 256),
        nn.Flatten(),
        nn.Linear(256 * side * side, 512),
        nn.ReLU(inplace=True),
    )
    return body, 512


def _digits_net(in_chans: int) -> tuple[nn.Module, int]:
    body = nn.Sequential(
        *_conv_bn(in_chans, 32),
        *_conv_bn(32, 64, pool=True),
        *_conv_bn(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return body, 64


def _resnet18_cifar(in_chans: int) -> tuple[nn.Module, int]:
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    # CIFAR form (He et al. 2016, section 4.2; the paper's CIFAR setup): a 3x3 stride-1 stem and
    # no max-pool, so a 32x32 input keeps a 4x4 map before the global pool.
    net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def _split_head(net: nn.Module) -> nn.Linear | None:
    """Replace the last ``nn.Linear`` of ``net`` (in place) by ``nn.Identity`` and return it.

    The head is the last Linear layer, whatever the architecture calls it (fc, classifier[-1],
    heads.head), so the rest of the network yields the features. None when there is none.
    """
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        return None
    parent_name, _, attr = last.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    head = net.get_submodule(last)
    setattr(parent, attr, nn.Identity())
    return head


def _pretrained_state(arch: str) -> dict:
    """torchvision's default weights for ``arch``, from the hub cache or downloaded into it."""
    import urllib.error

    import torch.hub
    import torchvision.models as tvm

    weights = tvm.get_model_weights(arch).DEFAULT
    cached = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rpartition('/')[2]}"
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError) as e:
        raise UsageError(
            f"the pretrained weights of torchvision:{arch} ({weights}) are not in {cached} and "
            f"could not be downloaded ({e}); copy {weights.url} there (TORCH_HOME moves the "
            "folder) or train without --pretrained") from None


def _torchvision(arch: str, pretrained: bool = False) -> tuple[nn.Module, int]:
    import torchvision.models as tvm

    try:
        builder = tvm.get_model_builder(arch)
    except ValueError:
        raise UnknownModelError(
            f"unknown torchvision model {arch!r}; see torchvision.models.list_models()"
        ) from None
    net = builder(weights=None)
    if pretrained:
        net.load_state_dict(_pretrained_state(arch))
    head = _split_head(net)
    if head is None:
        raise UnknownModelError(f"torchvision model {arch!r} has no final nn.Linear head")
    return net, head.in_features


def create_model(name: str, num_classes: int, in_chans: int = 3, image_size: int = 32, *,
                 pretrained: bool = False) -> Classifier:
    """Build a randomly initialised classifier by name (see the module docstring).

    Args:
        name: ``resnet18``, ``tiny-cnn``, ``cnn-fc``, ``digits-net`` or ``torchvision:<arch>``.
        num_classes: C, the size of the head's output.
        in_chans: 1 (grayscale) or 3 (RGB).
        image_size: side of the crops the model will see (recorded for checkpoints).
        pretrained: ``torchvision:<arch>`` only: start from torchvision's default (ImageNet)
            weights, read from torch's hub cache or downloaded into it; the head is new.

    Raises:
        UnknownModelError: for an unknown name (a ``ValueError``).
        UsageError: ``pretrained`` for a model torchvision does not build, or its weights
            neither cached nor downloadable (the message names where they are looked for).
    """
    if pretrained and not name.startswith("torchvision:"):
        raise UsageError(f"pretrained weights exist for torchvision:<arch> models only, not {name!r}")
    if num_classes < 2:
        raise UsageError(f"num_classes must be >= 2, got {num_classes}")
    if in_chans not in (1, 3):
        raise UsageError(f"in_chans must be 1 or 3, got {in_chans}")
    expand = False
    if name == "resnet18":
        backbone, dim = _resnet18_cifar(in_chans)
    elif name == "tiny-cnn":
        backbone, dim = _tiny_cnn(in_chans)
    elif name == "cnn-fc":
        if image_size % 8 or image_size < 8:
            raise UsageError(f"cnn-fc needs an image side divisible by 8, got {image_size}")
        backbone, dim = _cnn_fc(in_chans, image_size)
    elif name == "digits-net":
        backbone, dim = _digits_net(in_chans)
    elif name.startswith("torchvision:"):
        backbone, dim = _torchvision(name.partition(":")[2], pretrained)
        expand = in_chans == 1
    else:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of resnet18, tiny-cnn, cnn-fc, digits-net, "
            "torchvision:<arch> (e.g. torchvision:resnet50)"
        )
    mean, std = (RGB_MEAN, RGB_STD) if in_chans == 3 else (GRAY_MEAN, GRAY_STD)
    if expand:
        mean, std = GRAY_MEAN, GRAY_STD
    head = nn.Linear(dim, num_classes)
    return Classifier(backbone, head, name=name, num_classes=num_classes, in_chans=in_chans,
                      image_size=image_size, mean=mean, std=std, expand_gray=expand)


def as_classifier(model: nn.Module, *, num_classes: int, in_chans: int = 3, image_size: int = 32,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Classifier:
    """A model built elsewhere as a ``Classifier``: its last ``nn.Linear`` becomes the head.

    A ``Classifier`` is returned as is. Otherwise ``model`` is copied (the original is not
    touched), its last ``nn.Linear`` split off as ``head`` and the rest kept as the backbone;
    the copy is checked to compute what ``model`` computes. The model receives what it was
    trained on: pixels scaled to [0, 1] and normalised by ``mean``/``std`` (default: ImageNet's
    for colour, as torchvision's weights expect; 0.5/0.25 for grayscale).

    Raises:
        UsageError: no ``nn.Linear``, a head with another number of classes, or a last
            ``nn.Linear`` that is not the model's final layer (wrap such a model yourself:
            ``features(x)`` and a linear ``head``, see the module docstring).
    """
    import copy

    if isinstance(model, Classifier):
        return model
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch nn.Module, got {type(model).__name__}")
    kind = type(model).__name__
    backbone = copy.deepcopy(model)
    head = _split_head(backbone)
    if head is None:
        raise UsageError(f"{kind} has no nn.Linear layer to take as its classification head")
    if head.out_features != num_classes:
        raise UsageError(f"{kind}'s last nn.Linear has {head.out_features} outputs but the store "
                         f"has {num_classes} classes: replace the head first")
    if mean is None or std is None:
        mean, std = (RGB_MEAN, RGB_STD) if in_chans == 3 else (GRAY_MEAN, GRAY_STD)
    wrapped = Classifier(backbone, head, name=f"module:{kind}", num_classes=num_classes,
                         in_chans=in_chans, image_size=image_size, mean=mean, std=std)
    _check_same_output(model, wrapped, in_chans, image_size)
    return wrapped


def classifier_for_store(model: nn.Module, manifest: dict) -> Classifier:
    """``as_classifier`` for the images of a store: its classes, channels and crop side."""
    from swift_sampler.pipeline.features.crop_stream import output_size

    image = manifest.get("image") or {}
    side = output_size(manifest, None)
    return as_classifier(model, num_classes=len(manifest["classes"]),
                         in_chans=int(image.get("channels") or 3),
                         image_size=side[0] if side else int(image.get("height") or 32))


def _check_same_output(model: nn.Module, wrapped: Classifier, in_chans: int, image_size: int) -> None:
    # An nn.Linear used before the end (an attention projection after the classifier, a
    # layer applied in forward() outside the module tree) makes the split wrong: catch it.
    device = next(model.parameters(), torch.empty(0)).device
    x = torch.rand(2, in_chans, image_size, image_size, generator=torch.Generator().manual_seed(0))
    was = model.training, wrapped.training
    model.eval()
    wrapped.to(device).eval()
    try:
        with torch.no_grad():
            x = x.to(device)
            expected = model(wrapped.normalise(x))
            got = wrapped(x)
    except RuntimeError as e:  # the model refuses the store's image shape
        raise UsageError(f"{type(model).__name__} does not take a batch of {in_chans}x{image_size}"
                         f"x{image_size} images: {str(e).splitlines()[0]}") from e
    finally:
        model.train(was[0])
        wrapped.train(was[1])
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape or not torch.allclose(
            expected.float(), got.float(), rtol=1e-4, atol=1e-5):
        raise UsageError(f"{type(model).__name__}'s last nn.Linear is not its final layer: give it "
                         "features(x) and a linear head (swift_sampler.train.models.Classifier)")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
