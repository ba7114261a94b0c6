"""Per-crop scores against slow, obvious references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from swift_sampler.pipeline.features.scoring import (
    cross_entropy,
    entropy_r,
    full_grad_norm,
    last_layer_grad_norm,
    score_batch,
)


def entropy_r_literal(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Equation 11 written out: drop p_y, renormalise the rest, take the entropy."""
    out = []
    for z, y in zip(logits.astype(np.float64), labels):
        p = np.exp(z - z.max())
        p /= p.sum()
        rest = np.delete(p, y)
        q = rest / rest.sum()
        out.append(-sum(qj * math.log(qj) for qj in q if qj > 0))
    return np.array(out)


@pytest.mark.parametrize("classes", [3, 10, 100])
def test_entropy_r_matches_equation_11(classes):
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(64, classes, generator=g) * 3
    labels = torch.randint(classes, (64,), generator=g)
    got = entropy_r(logits, labels).numpy()
    np.testing.assert_allclose(got, entropy_r_literal(logits.numpy(), labels.numpy()), rtol=1e-5, atol=1e-6)
    assert (got >= -1e-6).all() and (got <= math.log(classes - 1) + 1e-5).all()


def test_entropy_r_is_stable_when_the_target_dominates():
    # p_y rounds to 1 in float32; the non-target distribution is still softmax([0, 1, 2]).
    logits = torch.tensor([[500.0, 0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 500.0]])
    got = entropy_r(logits, torch.tensor([0, 3]))
    want = entropy_r_literal(np.array([[0.0, 0.0, 1.0, 2.0]]), np.array([0]))[0]
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), [want, want], rtol=1e-5)
    assert torch.isfinite(cross_entropy(logits, torch.tensor([1, 0]))).all()


def test_entropy_r_is_zero_for_two_classes_and_independent_of_the_target_logit():
    logits = torch.randn(16, 2)
    assert torch.equal(entropy_r(logits, torch.randint(2, (16,))), torch.zeros(16))
    a = torch.randn(8, 5)
    b = a.clone()
    b[:, 0] += 7.0  # moving the target logit changes the loss, not E^r
    y = torch.zeros(8, dtype=torch.long)
    torch.testing.assert_close(entropy_r(a, y), entropy_r(b, y))
    assert not torch.allclose(cross_entropy(a, y), cross_entropy(b, y))


@pytest.mark.parametrize("bias", [True, False])
def test_last_layer_grad_norm_matches_autograd_per_sample(bias):
    torch.manual_seed(0)
    head = nn.Linear(12, 5, bias=bias)
    h = torch.randn(10, 12) * 2
    y = torch.randint(5, (10,))
    want = []
    for i in range(10):
        head.zero_grad()
        F.cross_entropy(head(h[i : i + 1]), y[i : i + 1]).backward()
        sq = head.weight.grad.pow(2).sum() + (head.bias.grad.pow(2).sum() if bias else 0)
        want.append(sq.sqrt().item())
    got = last_layer_grad_norm(head(h).detach(), y, h, bias=bias)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


class ConvBN(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.Conv2d(6, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(6, classes)

    def features(self, x):
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def _trained_bn(model: nn.Module) -> nn.Module:
    # Non-trivial running statistics, so eval-mode BN is not the identity.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8))
    return model.eval()


def test_full_grad_norm_matches_a_per_sample_autograd_loop():
    torch.manual_seed(1)
    model = _trained_bn(ConvBN())
    x = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(4, (7,))
    want = []
    for i in range(7):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        want.append(math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters())))
    np.testing.assert_allclose(full_grad_norm(model, x, y, chunk_size=3).numpy(), want, rtol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        full_grad_norm(model.train(), x, y)


def test_full_equals_last_layer_when_only_the_head_has_parameters():
    class HeadOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3 * 4 * 4, 6)

        def features(self, x):
            return x.float().flatten(1) / 255

        def forward(self, x):
            return self.head(self.features(x))

    torch.manual_seed(2)
    model = HeadOnly().eval()
    x = torch.randint(0, 256, (9, 3, 4, 4), dtype=torch.uint8)
    y = torch.randint(6, (9,))
    last = score_batch(model, x, y, grad_norm="last-layer")
    full = score_batch(model, x, y, grad_norm="full")
    torch.testing.assert_close(last["grad_norm"], full["grad_norm"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last["loss"], cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="grad_norm"):
        score_batch(model, x, y, grad_norm="everything")
