"""Per-crop scores of a frozen classifier: loss, renormed entropy E^r, gradient norm.

All functions take logits ``(B, C)`` and integer labels ``(B,)`` and return float32 tensors of
shape ``(B,)``; the math runs in float32 whatever the dtype of the inputs.

- ``loss``: cross-entropy with the label used for training.
- ``entropy_r``: equation 11 of the paper: drop the target class, renormalise the other
  probabilities to sum 1 and take their entropy. Renormalising ``p_j / sum_{k != y} p_k`` is the
  softmax over the non-target logits, so it is computed as a log-softmax with the target logit
  masked to ``-inf``: stable even when ``p_y`` rounds to 1.
- ``grad_norm``: the norm of the per-sample gradient of the loss. ``last_layer_grad_norm`` is exact
  for the linear head (weight and bias): ``dL/dW = (p - onehot(y)) h^T`` and ``dL/db = p - onehot(y)``,
  so the norm is ``||p - onehot(y)|| * sqrt(||h||^2 + 1)``. ``full_grad_norm`` is exact over every
  parameter, with ``torch.func`` (vmap of grad), and costs several backward passes per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GRAD_NORM_MODES = ("last-layer", "full")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy, float32 ``(B,)``."""
    return F.cross_entropy(logits.float(), labels.long(), reduction="none")


def entropy_r(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Renormed entropy of the non-target classes (equation 11), float32 ``(B,)``.

    With two classes only one non-target class is left, whose renormalised probability is 1,
    so ``E^r = 0``. Values lie in ``[0, log(C - 1)]``.
    """
    logits = logits.float()
    target = F.one_hot(labels.long(), logits.shape[1]).bool()
    rest = logits.masked_fill(target, float("-inf"))
    logq = torch.log_softmax(rest, dim=1)
    # q * log q is 0 for the masked target (q = 0, log q = -inf): write the zero explicitly.
    plogp = torch.where(target, torch.zeros_like(logq), logq.exp() * logq)
    return -plogp.sum(dim=1)


def last_layer_grad_norm(logits: torch.Tensor, labels: torch.Tensor, h: torch.Tensor, *,
                         bias: bool = True) -> torch.Tensor:
    """Exact per-sample gradient norm of the cross-entropy w.r.t. a linear head ``(W, b)``.

    Args:
        logits: ``(B, C)``, the head's output for ``h``.
        labels: ``(B,)`` integer class ids.
        h: ``(B, D)`` penultimate features, the head's input.
        bias: whether the head has a bias (adds the ``+ 1`` term).

    Returns:
        float32 ``(B,)``: ``||softmax(logits) - onehot(y)|| * sqrt(||h||^2 + 1)``.
    """
    p = torch.softmax(logits.float(), dim=1)
    delta = p - F.one_hot(labels.long(), p.shape[1]).float()
    return delta.norm(dim=1) * torch.sqrt(h.float().pow(2).sum(dim=1) + float(bias))


def full_grad_norm(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *,
                   chunk_size: int | None = 32) -> torch.Tensor:
    """Exact per-sample gradient norm of the cross-entropy over every trainable parameter.

    Uses ``torch.func.functional_call`` + ``vmap(grad)``; the model must be in eval mode so that
    BatchNorm uses its running statistics (a per-sample gradient is otherwise undefined).
    ``chunk_size`` bounds memory: ``vmap`` holds ``chunk_size`` copies of the gradients at once.

    Args:
        model: classifier ``x -> logits``, in eval mode.
        x: ``(B, C, H, W)`` uint8 or float batch.
        labels: ``(B,)`` integer class ids.

    Returns:
        float32 ``(B,)``.
    """
    from torch.func import functional_call, grad, vmap

    if model.training:
        raise ValueError("full_grad_norm needs the model in eval mode (BatchNorm running statistics)")
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, xi, yi):
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits.float(), yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, x, labels.long())
    sq = sum(g.float().pow(2).flatten(1).sum(dim=1) for g in grads.values())
    return torch.sqrt(sq)


def score_batch(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *,
                grad_norm: str = "last-layer", autocast: bool = False) -> dict[str, torch.Tensor]:
    """Score one batch of crops with a frozen model (``model.features`` + linear ``model.head``).

    The body runs under ``autocast`` (bf16) when asked; the head and every score are computed
    in float32 so that ``grad_norm`` matches the logits it is derived from.

    Returns:
        ``{"loss", "entropy_r", "grad_norm"}``, float32 ``(B,)`` tensors on ``x``'s device.
    """
    if grad_norm not in GRAD_NORM_MODES:
        raise ValueError(f"grad_norm must be one of {GRAD_NORM_MODES}, got {grad_norm!r}")
    with torch.no_grad():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            h = model.features(x)
        h = h.float()
        head = model.head
        logits = F.linear(h, head.weight.float(), None if head.bias is None else head.bias.float())
        out = {"loss": cross_entropy(logits, labels), "entropy_r": entropy_r(logits, labels)}
        if grad_norm == "last-layer":
            out["grad_norm"] = last_layer_grad_norm(logits, labels, h, bias=head.bias is not None)
    if grad_norm == "full":
        out["grad_norm"] = full_grad_norm(model, x, labels)
    return out
