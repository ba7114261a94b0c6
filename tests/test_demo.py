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
