"""A model built elsewhere as w_share: a torchvision network passed as a module scores a store
and is evaluated; --pretrained starts from torchvision's weights, read from the hub cache."""

from __future__ import annotations

import shutil
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

import swift_sampler as ss
from swift_sampler.storage import StoreLayout, read_manifest
from swift_sampler.storage.errors import UsageError
from swift_sampler.train.models import as_classifier, classifier_for_store, create_model


def _digits_resnet() -> nn.Module:
    """A randomly initialised torchvision ResNet-18 for 1-channel 8x8 digits."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    return net


def test_as_classifier_splits_the_last_linear_and_computes_what_the_model_computes():
    net = _digits_resnet().eval()
    wrapped = as_classifier(net, num_classes=10, in_chans=1, image_size=8).eval()
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        expected = net(wrapped.normalise(x))
        assert torch.allclose(wrapped(x), expected, atol=1e-5)
        assert torch.allclose(wrapped.head(wrapped.features(x)), expected, atol=1e-5)
    assert isinstance(net.fc, nn.Linear), "the user's model is left as it was"
    assert wrapped.head.weight.data_ptr() != net.fc.weight.data_ptr(), "a copy, not the same weights"
    assert (wrapped.num_classes, wrapped.in_chans, wrapped.model_name) == (10, 1, "module:ResNet")


def test_as_classifier_names_what_it_cannot_take():
    with pytest.raises(UsageError, match="no nn.Linear"):
        as_classifier(nn.Sequential(nn.Conv2d(3, 10, 32), nn.Flatten()), num_classes=10)
    with pytest.raises(UsageError, match="1000 outputs but the store has 10 classes"):
        as_classifier(torchvision.models.resnet18(), num_classes=10)
    # A Linear that is not the final layer: the split would compute something else.
    not_last = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10), nn.Tanh())
    with pytest.raises(UsageError, match="not its final layer"):
        as_classifier(not_last, num_classes=10, image_size=4)
    with pytest.raises(UsageError, match="does not take a batch of 3x8x8"):
        as_classifier(nn.Sequential(nn.Flatten(), nn.Linear(5, 10)), num_classes=10, image_size=8)
    with pytest.raises(UsageError, match="must be a torch nn.Module"):
        as_classifier("resnet18", num_classes=10)
    ours = create_model("digits-net", 10, 1, 8)
    assert as_classifier(ours, num_classes=10) is ours


def test_a_torchvision_module_scores_a_store_and_is_evaluated(digits_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(digits_store, store)
    net = _digits_resnet()
    summary = ss.build_features(store, net, crops_per_image=2, workers=0, progress=False,
                                device="cpu", quantiles=16, angles=8)
    assert summary["rows"] == 2 * read_manifest(StoreLayout(store))["splits"]["train"]["count"]
    assert "dynamics" not in summary and not StoreLayout(store).dynamics.exists()
    # The stored loss of crop 0 (the plain view) is the module's own loss on that image.
    row = ss.sql(store, "SELECT index, label, loss FROM features WHERE crop = 0 ORDER BY index LIMIT 1")
    wrapped = classifier_for_store(net, read_manifest(StoreLayout(store))).eval()
    image = _train_image(store, row.column("index")[0].as_py())
    with torch.no_grad():
        loss = nn.functional.cross_entropy(wrapped(image[None]), torch.tensor([row.column("label")[0].as_py()]))
    assert row.column("loss")[0].as_py() == pytest.approx(loss.item(), rel=1e-3, abs=1e-4)

    result = ss.evaluate(store, net, "test", workers=0, device="cpu")
    assert result["count"] > 0 and 0.0 <= result["top1"] <= 1.0 and result["lost"] == 0


def _train_image(store, index: int) -> torch.Tensor:
    from swift_sampler.train.loader import create_loader

    loader, _ = create_loader(store, "train", batch_size=512, train=False, num_workers=0,
                              rank=0, world_size=1, image_size=8)
    for batch in loader:
        hit = (batch["index"] == index).nonzero()
        if len(hit):
            return batch["image"][hit[0, 0]]
    raise AssertionError(f"train image {index} not found")


def test_a_module_with_dynamics_features_is_refused_before_scoring(digits_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(digits_store, store)
    with pytest.raises(UsageError, match="loss_mean: training dynamics"):
        ss.build_features(store, _digits_resnet(), features_pair="loss_mean,loss", crops_per_image=1,
                          workers=0, progress=False, device="cpu", quantiles=16, angles=8)
    assert not StoreLayout(store).features_dir.exists(), "refused before scoring anything"


def test_pretrained_reads_torchvision_weights_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    cached = tmp_path / "torch" / "hub" / "checkpoints" / weights.url.rpartition("/")[2]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, cached)
    model = create_model("torchvision:resnet18", 10, 3, 32, pretrained=True)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.head.out_features == 10
    assert not torch.equal(create_model("torchvision:resnet18", 10, 3, 32).backbone.conv1.weight,
                           state["conv1.weight"])


def test_pretrained_weights_missing_offline_say_where_they_are_looked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UsageError, match=r"not in .*torch/hub/checkpoints/resnet18-.*\.pth .*no network"):
        create_model("torchvision:resnet18", 10, pretrained=True)
    with pytest.raises(UsageError, match="torchvision:<arch> models only"):
        create_model("tiny-cnn", 10, pretrained=True)


def test_train_cli_pretrained_with_init_is_refused(digits_store, tmp_path, capsys):
    from swift_sampler.cli import main

    store = tmp_path / "store"
    shutil.copytree(digits_store, store)
    code = main(["train", "--store", str(store), "--name", "a", "--model", "torchvision:resnet18",
                 "--pretrained", "--init", str(tmp_path / "none.pt"), "--epochs", "1"])
    assert code == 2
    assert "--init" in capsys.readouterr().err
