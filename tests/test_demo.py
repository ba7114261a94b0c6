"""The demo reports what the search hands a user: the learned sampler's full run, or w_share."""

from __future__ import annotations

import pytest

from swift_sampler.demo import DemoConfig, format_results, run_demo
from swift_sampler.train.evaluate import evaluate


@pytest.mark.slow
def test_demo_reports_the_model_the_search_recommends(tmp_path):
    summary = run_demo(DemoConfig(workdir=str(tmp_path / "demo"), steps=3, finetune_epochs=2,
                                  progress=False), log=lambda *a: None)
    found, acc = summary["search"], summary["test_top1"]
    assert acc["ss"] == pytest.approx(evaluate(summary["store"], found["model"], "test", workers=0)["top1"])
    if found["choice"] == "uniform":  # nothing retrained: the SS row is w_share
        assert acc["ss"] == acc["uniform"] and summary["ss"].startswith("w_share")
        assert summary["kept_fraction"] is None
    else:
        assert found["confirm"]["kept"] and summary["ss"].startswith("the learned sampler")
        assert summary["kept_fraction"] == pytest.approx(0.5, abs=0.05)
    assert f"Swift Sampler: {summary['ss']}" in format_results(summary)


def test_the_table_shows_the_evidence_and_its_noise():
    summary = {"test_top1": {"uniform": 0.93, "ss": 0.93, "clean": 0.98}, "noise": "symmetric:0.4",
               "ss": "w_share (the guard found no sampler better than uniform)", "figures": [],
               "store": "s", "search": {"guard": {"gains": {5: 0.012, 7: -0.003}, "margin": 0.021},
                                        "confirm": None}}
    text = format_results(summary)
    assert "best candidate +1.20% val top-1 over uniform" in text and "noise, 2.10%" in text
    assert "cannot be told from chance" in text
    summary["search"] = {"guard": {"gains": {5: 0.03}, "margin": 0.02},
                         "confirm": {"sampler_val_top1": 0.90, "uniform_val_top1": 0.88,
                                     "val_gain_se": 0.008, "kept": True}}
    text = format_results(summary)
    assert "+2.00% val top-1 over w_share (standard error 0.80%" in text
    assert "cannot be told from chance" not in text
