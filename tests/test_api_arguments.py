"""A wrong type passed to the Python API is refused at the edge, naming the argument, before
any work is done; dicts stand for the settings dataclasses."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import swift_sampler as ss
from swift_sampler.search.loop import GuardSettings
from swift_sampler.search.objective import InnerLoopSettings
from swift_sampler.storage.arguments import as_settings, check_argument
from swift_sampler.storage.errors import UsageError


@pytest.mark.parametrize("value, hint", [
    (3, int), (np.int64(3), int), (3, float), (np.float32(0.5), float), ("a", str),
    (None, int | None), (Path("x"), str | os.PathLike), ("x", os.PathLike), ((1, 2), tuple[int, ...]),
    ([1, 2], tuple[int, ...]), (True, bool), (np.bool_(False), bool), ({"a": 1}, dict[str, int]),
])
def test_values_of_the_right_type_pass(value, hint):
    check_argument("x", value, hint)


@pytest.mark.parametrize("value, hint, said", [
    ("3", int, "an integer"), (True, int, "an integer"), (2.0, int, "an integer"),
    ("0.1", float, "a number"), (False, float, "a number"), (0.4, str, "a string"),
    ("1", int | None, "an integer or None"), ((1, "2"), tuple[int, ...], "a list of integers"),
    ("12", tuple[int, ...], "a list of integers"), (1, bool, "True or False"),
])
def test_values_of_another_type_are_refused_by_name(value, hint, said):
    with pytest.raises(UsageError, match=f"^f: x must be {said}, got "):
        check_argument("x", value, hint, where="f")


def test_a_dict_stands_for_a_settings_dataclass():
    assert as_settings(InnerLoopSettings, {"epochs": 2}, name="finetune") == InnerLoopSettings(epochs=2)
    same = GuardSettings(enabled=False)
    assert as_settings(GuardSettings, same, name="guard") is same
    assert as_settings(GuardSettings, None, name="guard") is None
    with pytest.raises(UsageError, match="finetune: unknown field.*epoch;"):
        as_settings(InnerLoopSettings, {"epoch": 2}, name="finetune")
    with pytest.raises(UsageError, match="finetune: lr_fraction must be a number"):
        as_settings(InnerLoopSettings, {"lr_fraction": "0.5"}, name="finetune")
    with pytest.raises(UsageError, match="guard must be a GuardSettings or a dict"):
        as_settings(GuardSettings, [False], name="guard")


@pytest.mark.parametrize("options, said", [
    (dict(noise=0.4), "ingest: noise must be a string"),
    (dict(val_frac="0.2"), "ingest: val_frac must be a number"),
    (dict(limit="100"), "ingest: limit must be an integer or None"),
    (dict(seed="a"), "ingest: seed must be an integer"),
])
def test_ingest_names_a_wrongly_typed_option_and_writes_nothing(tmp_path, options, said):
    with pytest.raises(UsageError, match=said):
        ss.ingest("digits", tmp_path / "store", progress=False, **options)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("options, said", [
    (dict(epochs="2"), "training: epochs must be an integer"),
    (dict(lr="0.1"), "training: lr must be a number"),
    (dict(batch_size=32.0), "training: batch_size must be an integer"),
    (dict(milestones=("5",)), "training: milestones must be a list of integers"),
])
def test_training_names_a_wrongly_typed_option(digits_store, options, said):
    with pytest.raises(UsageError, match=said):
        ss.train_model(digits_store, "never", preset="digits", progress=False, **options)
    assert not (digits_store / "runs" / "never").exists()


def test_scoring_evaluation_search_and_sql_name_a_wrongly_typed_argument(scored_digits):
    from swift_sampler.pipeline.features.build import build_features
    from swift_sampler.train.models import create_model

    model = create_model("digits-net", 10, 1, 8)
    with pytest.raises(UsageError, match="build_features: crops_per_image must be an integer"):
        build_features(scored_digits, model, crops_per_image="2", progress=False)
    with pytest.raises(UsageError, match="evaluate: batch_size must be an integer"):
        ss.evaluate(scored_digits, model, batch_size="64")
    with pytest.raises(UsageError, match="evaluate: checkpoint_or_model must be"):
        ss.evaluate(scored_digits, torch.zeros(3))
    ckpt = scored_digits / "runs" / "absent" / "checkpoint.pt"  # refused before it is read
    with pytest.raises(UsageError, match="search: steps must be an integer"):
        ss.learn_sampler(scored_digits, ckpt, steps="3")
    with pytest.raises(UsageError, match="finetune: epochs must be an integer"):
        ss.learn_sampler(scored_digits, ckpt, finetune={"epochs": "1"})
    with pytest.raises(UsageError, match="sql: query must be a string"):
        ss.sql(scored_digits, 123)
    assert not (scored_digits / "searches" / "ss").exists()
