"""Two-process DDP on the CPU (gloo) through torchrun: identical weights, disjoint shares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_loader import make_store

TORCHRUN = Path(sys.executable).with_name("torchrun")

SCRIPT = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from swift_sampler.train.presets import resolve_config
    from swift_sampler.train.trainer import SamplerHook, fit

    store, out = sys.argv[1], sys.argv[2]
    seen = []

    def record(batch):
        seen.append(batch["index"].clone())
        return batch

    config = resolve_config(store, name="ddp", model="digits-net", epochs=2, batch_size=4,
                            lr=0.05, schedule="cosine", workers=0, progress=False,
                            shuffle_buffer=8)
    result = fit(config, sampler=SamplerHook(candidates_per_image=1, step_filter=record))
    rank = int(os.environ["RANK"])
    torch.save({"state": result.model.state_dict(), "seen": torch.cat(seen),
                "summary": result.summary}, os.path.join(out, f"rank{rank}.pt"))
""")


def run_torchrun(args, cwd, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_process_gloo_ddp(tmp_path):
    store = make_store(tmp_path / "s", splits={"train": 64, "val": 16}, shard_size=8)
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    proc = run_torchrun([str(script), str(store), str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    # Each rank's share: 64 / 2 ranks = 32 per epoch; together each epoch covers all samples.
    per_epoch = 64 // 2
    for epoch in range(2):
        a = r0["seen"][epoch * per_epoch:(epoch + 1) * per_epoch].tolist()
        b = r1["seen"][epoch * per_epoch:(epoch + 1) * per_epoch].tolist()
        assert len(a) == len(b) == per_epoch
        assert not set(a) & set(b) and sorted(a + b) == list(range(64))
    assert r0["summary"]["world_size"] == 2
    # Rank 0 alone wrote the run folder.
    run = store / "runs" / "ddp"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint-best.pt", "checkpoint-e001.pt", "checkpoint.pt", "config.json",
        "dynamics.parquet", "metrics.jsonl", "summary.json"]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2


DYNAMICS_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from swift_sampler.train import dynamics
    from swift_sampler.train.presets import resolve_config
    from swift_sampler.train.trainer import fit

    store, out = sys.argv[1], sys.argv[2]
    views, observe = [[]], dynamics.TrainingDynamics.observe

    def spy(self, index, logits, labels):
        views[-1].append((index.clone(), logits.detach().float().clone(), labels.clone()))
        observe(self, index, logits, labels)

    dynamics.TrainingDynamics.observe = spy
    config = resolve_config(store, name="dyn", model="digits-net", epochs=2, batch_size=4,
                            lr=0.05, schedule="cosine", workers=0, progress=False,
                            shuffle_buffer=8)
    fit(config, on_epoch_end=lambda m: views.append([]))
    torch.save(views[:-1], os.path.join(out, f"views{os.environ['RANK']}.pt"))
""")


def test_two_ranks_record_the_dynamics_of_one(tmp_path):
    """Rank 0's table is what one process makes of both ranks' training steps."""
    import pyarrow.parquet as pq

    from swift_sampler.train.distributed import DistInfo
    from swift_sampler.train.dynamics import TrainingDynamics

    store = make_store(tmp_path / "s", splits={"train": 32, "val": 8}, shard_size=8)
    script = tmp_path / "dyn_script.py"
    script.write_text(DYNAMICS_SCRIPT)
    proc = run_torchrun([str(script), str(store), str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"views{r}.pt", weights_only=True) for r in (0, 1)]
    one = TrainingDynamics(32)
    single = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for epoch in range(2):
        for views in ranks:
            for index, logits, labels in views[epoch]:
                one.observe(index, logits, labels)
        one.end_epoch(epoch, single)
    written = pq.read_table(store / "runs" / "dyn" / "dynamics.parquet")
    assert written.equals(one.table())
    assert set(written.column("epochs_seen").to_pylist()) == {2}


@pytest.mark.slow
def test_cli_under_torchrun(tmp_path):
    store = make_store(tmp_path / "s", splits={"train": 64, "val": 16}, shard_size=8)
    proc = run_torchrun(["-m", "swift_sampler", "train", "--store", str(store), "--name", "cli",
                         "--model", "digits-net", "--epochs", "1", "--batch-size", "4",
                         "--workers", "1", "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["world_size"] == 2


def test_search_run_under_torchrun_through_the_cli(tmp_path):
    """Rank 1 gets no files of rank 0's search and must not read them (it raised KeyError)."""
    import swift_sampler

    store = tmp_path / "store"
    swift_sampler.ingest("digits", store, noise="symmetric:0.4", val_frac=0.2, test_frac=0.2,
                         shard_size=400, progress=False)
    ckpt = swift_sampler.train_model(store, "w_share", epochs=2, workers=0, progress=False)["checkpoint"]
    # build-features under torchrun reports the parts of every rank, not rank 0's alone.
    proc = run_torchrun(["-m", "swift_sampler", "pipeline", "build-features", "--store", str(store),
                         "--checkpoint", ckpt, "--crops-per-image", "2", "--json"],
                        cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")][-1]
    shards = len(swift_sampler.storage.StoreLayout(store).shards("train"))
    assert built["parts_written"] == shards == 3
    proc = run_torchrun(["-m", "swift_sampler", "search", "run", "--store", str(store),
                         "--checkpoint", ckpt, "--name", "ddp", "--steps", "2",
                         "--finetune-epochs", "1", "--guard-candidates", "1", "--guard-repeats", "2",
                         "--workers", "0", "--device", "cpu", "--json"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints the summary
    # 2 search trials, uniform on 2 seeds, the early guard's uniform and candidate on those 2
    assert lines[0]["search_trials"] == 2 and lines[0]["trials"] == 2 + 2 + 2 * 2
    # The guard's winner is checked by a full run under torchrun; a model to use either way.
    s = lines[0]
    if s["guard"]["winner"] is None:
        assert s["choice"] == "uniform" and s["confirm"] is None and s["model"] == ckpt
    elif s["confirm"]["kept"]:
        assert s["choice"] == "guard" and s["model"] == s["confirm"]["checkpoint"]
    else:
        assert s["choice"] == "uniform" and s["model"] == ckpt
