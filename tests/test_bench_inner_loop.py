"""The inner-loop study on the tiny preset: a sub-panel without noise, resumable, its report."""

from __future__ import annotations

import json

import bench_inner_loop
import pytest
import torch


def test_study_on_a_sub_panel_without_noise_resumes_and_reports(shared_cifar, tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "study"
    argv = ["--data", shared_cifar, "--out", str(out), "--preset", "tiny", "--noise", "none",
            "--panel", "step-0.5,ramp-linear", "--parts", "truth0,scratch-crn,early-crn",
            "--truth-seeds", "1", "--noise-repeats", "2", "--searched", str(tmp_path / "none.json"),
            "--workers", "0"]
    assert bench_inner_loop.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    doc = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in doc["panel"]] == ["uniform", "step-0.5", "ramp-linear"]
    assert doc["config"]["noise"] == "none" and summary["panel"] == 3
    assert [t["seeds"] for t in doc["truth"]] == [1, 1, 1]
    rows = {p["name"]: p for p in doc["proxies"]}
    for name in ("scratch-crn:top1", "early-crn:top1", "scratch-crn:prob"):
        assert rows[name]["n"] == 3 and rows[name]["noise_repeats"] == 2
        assert all(0 <= x <= 1 for x in rows[name]["scores"])
    assert rows["finetune:top1"]["n"] == 0  # not run: no score, no correlation
    assert rows["finetune:top1"]["spearman"] is None
    assert sum(p["default"] for p in doc["proxies"]) == 1
    assert "| step-0.5 | step |" in (out / "results.md").read_text()

    # Again: every unit is reused (nothing retrained), the panel stays fixed.
    units = {p.name: p.read_bytes() for p in (out / "units").glob("*.json")}
    assert bench_inner_loop.main([*argv[:8], "--panel", "step-0.3", *argv[10:]]) == 0
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in (out / "units").glob("*.json")} == units
    assert [p["name"] for p in json.loads((out / "results.json").read_text())["panel"]] == \
        ["uniform", "step-0.5", "ramp-linear"]


def test_an_unknown_panel_name_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_inner_loop.main(["--out", str(tmp_path / "s"), "--panel", "step-0.4",
                               "--searched", str(tmp_path / "none.json"), "--preset", "tiny",
                               "--data", str(tmp_path)])
    assert e.value.code == 2 and "unknown panel sampler(s) step-0.4" in capsys.readouterr().err


def test_the_keep_rule_is_fixed_once_a_study_has_units(tmp_path):
    import argparse

    def args(selection, report_only=False):
        return argparse.Namespace(selection=selection, report_only=report_only)

    def error(msg):
        raise RuntimeError(msg)

    out = tmp_path / "study"
    (out / "units").mkdir(parents=True)
    (out / "units" / "truth-uniform-s0.json").write_text("{}")  # a study from before the setting
    with pytest.raises(RuntimeError, match="--selection es"):
        bench_inner_loop.check_selection(out, args("systematic"), error)
    a = args("systematic", report_only=True)
    bench_inner_loop.check_selection(out, a, error)  # a report says what the units used
    assert a.selection == "es"
    fresh = tmp_path / "fresh"
    (fresh / "units").mkdir(parents=True)
    (fresh / "units" / "w_share.json").write_text("{}")  # trained without the stage: no evidence
    bench_inner_loop.check_selection(fresh, args("systematic"), error)
    assert json.loads((fresh / "selection.json").read_text()) == {"selection": "systematic"}
    with pytest.raises(RuntimeError, match="--selection systematic"):
        bench_inner_loop.check_selection(fresh, args("es"), error)
