"""Model contract, checkpoints and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from swift_sampler.train.checkpoint import (
    CheckpointError,
    load_model,
    load_weights,
    save_checkpoint,
)
from swift_sampler.train.models import UnknownModelError, create_model
from swift_sampler.train.schedules import cosine, lr_at, multistep, one_cycle

CASES = [("tiny-cnn", 3, 32), ("digits-net", 1, 8), ("resnet18", 3, 16),
         ("torchvision:resnet18", 1, 32)]


@pytest.mark.parametrize("name,chans,size", CASES)
def test_model_contract(name, chans, size):
    torch.manual_seed(0)
    model = create_model(name, 7, chans, size).eval()
    x = torch.randint(0, 256, (3, chans, size, size), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(x)
        h = model.features(x)
        assert logits.shape == (3, 7) and h.ndim == 2 and h.shape[0] == 3
        assert isinstance(model.head, torch.nn.Linear) and model.head.in_features == h.shape[1]
        torch.testing.assert_close(model.head(h), logits)
        # uint8 pixels and the same image as floats in [0, 1] give the same logits
        torch.testing.assert_close(model(x.float() / 255), logits, rtol=1e-4, atol=1e-4)
        cl = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), logits,
                                   rtol=1e-4, atol=1e-4)


def test_resnet18_has_cifar_stem():
    m = create_model("resnet18", 10)
    stem = m.backbone.conv1
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert isinstance(m.backbone.maxpool, torch.nn.Identity)


def test_unknown_model_names():
    with pytest.raises(UnknownModelError, match="unknown model 'vgg-nope'"):
        create_model("vgg-nope", 10)
    with pytest.raises(UnknownModelError, match="unknown torchvision model"):
        create_model("torchvision:not_a_net", 10)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    model = create_model("tiny-cnn", 5).eval()
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, epoch=3, store_id="abc", config={"lr": 0.1})
    loaded, meta = load_model(path)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["epoch"] == 3 and meta["store_id"] == "abc" and meta["model_name"] == "tiny-cnn"


def test_checkpoint_mismatches_are_clear(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, create_model("tiny-cnn", 5))
    ckpt = torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match="5 classes"):
        load_weights(create_model("tiny-cnn", 10), ckpt)
    with pytest.raises(CheckpointError, match="holds a 'tiny-cnn' model"):
        load_weights(create_model("resnet18", 5), ckpt)
    bad = dict(ckpt, model={k: v for k, v in ckpt["model"].items() if "head" not in k})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_weights(create_model("tiny-cnn", 5), bad)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "junk.pt")


def test_multistep_matches_the_paper_recipe():
    for t in [0, 10.5, 39.99, 40, 41.2, 79.9]:
        expect = 0.1 if t < 40 else 0.1 * 0.1
        assert math.isclose(multistep(t, lr=0.1, milestones=[40]), expect)
    assert math.isclose(multistep(65, lr=1.0, milestones=[30, 60], gamma=0.5), 0.25)


def test_multistep_warms_up_linearly_then_steps():
    assert multistep(0.0, lr=0.1, milestones=[30], warmup=2) == 0.0
    assert math.isclose(multistep(0.5, lr=0.1, milestones=[30], warmup=2), 0.025)
    assert math.isclose(multistep(2.0, lr=0.1, milestones=[30], warmup=2), 0.1)
    assert math.isclose(multistep(31, lr=0.1, milestones=[30], warmup=2), 0.01)
    assert math.isclose(lr_at(1.0, schedule="multistep", lr=0.1, epochs=60, milestones=[30],
                              warmup=4), 0.025)


def test_one_cycle_matches_torch_reference():
    steps, epochs = 100, 5
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=steps * epochs + 1,
                                              pct_start=0.25, anneal_strategy="linear",
                                              div_factor=25, final_div_factor=1e3,
                                              cycle_momentum=False)
    for i in range(steps * epochs):
        ours = one_cycle(i / steps, lr=0.4, epochs=epochs)
        assert math.isclose(ours, ref.get_last_lr()[0], rel_tol=1e-2, abs_tol=1e-6), i
        opt.step()
        ref.step()


def test_cosine_and_dispatch():
    assert cosine(0, lr=1.0, epochs=10) == 1.0
    assert math.isclose(cosine(5, lr=1.0, epochs=10), 0.5)
    assert math.isclose(cosine(10, lr=1.0, epochs=10), 0.0, abs_tol=1e-12)
    assert math.isclose(cosine(0.5, lr=1.0, epochs=10, warmup=1), 0.5)
    assert lr_at(3, schedule="constant", lr=0.3, epochs=9) == 0.3
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, schedule="zigzag", lr=0.1, epochs=1)
