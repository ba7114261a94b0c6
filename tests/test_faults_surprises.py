"""Faults a hostile run found: each test failed before its fix (docs/reliability.md)."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
from faultlib import (
    CLI,
    ENV,
    base_store,
    copy_store,
    ingest_args,
    main_in_process,
    make_checkpoint,
)

from swift_sampler.train.checkpoint import CheckpointError, load_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return base_store(tmp_path_factory)


def test_unknown_val_split_is_refused(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    code, err = main_in_process("train", "--store", store, "--name", "r", "--epochs", "1",
                                "--workers", "0", "--val-split", "foo")
    assert code == 2 and "unknown --val-split 'foo'" in err, err
    assert not (store / "runs" / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_says_so(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    code, err = main_in_process("train", "--store", store, "--name", "r", "--epochs", "1",
                                "--workers", "0", "--device", "cuda")
    assert code == 2 and "this machine has none" in err, err


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    (lambda p: p.write_bytes(bytes(range(256)) * 8), "is not a checkpoint of this project"),
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "is truncated or damaged"),
])
def test_damaged_checkpoints_get_one_clear_message_each(base, tmp_path, damage, needle):
    ckpt = make_checkpoint(base, tmp_path / "w.pt")
    damage(ckpt)
    with pytest.raises(CheckpointError, match=re.escape(needle)) as e:
        load_checkpoint(ckpt)
    assert "weights_only" not in str(e.value)
    code, err = main_in_process("evaluate", "--store", base, "--checkpoint", ckpt, "--workers", "0")
    assert code == 2 and needle in err and "Traceback" not in err, err


def test_sql_into_a_closed_pipe_exits_quietly(base):
    proc = subprocess.run(f"{' '.join(CLI)} sql {base} 'SELECT * FROM samples a, samples b' --json | head -1",
                          shell=True, capture_output=True, text=True, env=ENV, timeout=300)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_a_store_with_figures_can_be_ingested_over(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    (store / "figures").mkdir()
    (store / "figures" / "noise_density.png").write_bytes(b"png")
    code, err = main_in_process(*ingest_args(store), "--overwrite")
    assert code == 0, err
    assert not (store / "figures").exists()


def test_killing_the_main_process_alone_leaves_no_lock_behind(base, tmp_path):
    """DataLoader workers outlive a SIGKILLed parent for seconds; they must not hold its lock."""
    import os
    import signal
    import time

    from faultlib import Running, files_at_least, run_cli

    store = copy_store(base, tmp_path / "store")
    run = store / "runs" / "t"
    cmd = ("train", "--store", store, "--name", "t", "--preset", "digits", "--epochs", "20",
           "--workers", "2", "--json")
    with Running(*cmd) as r:
        ready = files_at_least(run, "checkpoint.pt", 1)
        deadline = time.monotonic() + 300
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        while not _children(r.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.005)  # an epoch's workers are up (they fork at each epoch)
        assert r.alive(), "training finished before it could be killed"
        os.kill(r.proc.pid, signal.SIGKILL)  # the main PID only: its workers live on a while
        r.proc.wait()
        from swift_sampler.storage import StoreLayout, exclusive_lock

        with exclusive_lock(StoreLayout(store).lock("run-t"), "run t"):  # at once, no wait
            pass
        again = run_cli("train", "--store", store, "--name", "t", "--preset", "digits",
                        "--epochs", "20", "--workers", "0", "--resume", "--json")
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(r.proc.pid, signal.SIGKILL)  # any worker still alive
    assert again.returncode == 0, again.describe()
    assert "in use by another process" not in again.stderr


def _children(pid: int) -> list[int]:
    import os

    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


@pytest.mark.parametrize("statement, word", [("INSTALL httpfs", "INSTALL"), ("CHECKPOINT", "CHECKPOINT")])
def test_refused_statements_are_named_as_written(base, statement, word):
    code, err = main_in_process("sql", base, statement)
    assert code == 2 and f"{word} statements are refused" in err, err


@pytest.mark.parametrize("value", ["0.3", True])
def test_a_sampler_value_that_is_not_a_number_says_so(value):
    from swift_sampler.pipeline.sampler.function import SamplerError, check_parameters

    params = {"e1": 0.25, "e2": 0.5, "e3": 0.75, "v0": 1, "v1": 1, "v2": 1, "v3": 1, "v4": 1,
              "c1": value, "c2": 0.0}
    with pytest.raises(SamplerError, match="c1: .* is not a number"):
        check_parameters(params)


def test_store_is_accepted_as_an_option_everywhere(base):
    code, err = main_in_process("sql", "--store", base, "SELECT count(*) FROM samples")
    assert code == 0, err
    code, err = main_in_process("sql", base, "SELECT count(*) FROM samples")
    assert code == 0, err
    code, err = main_in_process("sql", "SELECT 1")
    assert code == 2 and "pass --store" in err, err


def test_a_checkpoint_of_another_store_is_named_by_evaluate_and_train_init(base, tmp_path, caplog):
    import logging

    from swift_sampler.train.checkpoint import load_checkpoint, save_checkpoint
    from swift_sampler.train.models import create_model

    ckpt = make_checkpoint(base, tmp_path / "w.pt")
    meta = load_checkpoint(ckpt)
    other = tmp_path / "other.pt"
    model = create_model(meta["model_name"], meta["num_classes"], meta["in_chans"], meta["image_size"])
    save_checkpoint(other, model, store_id="another-store")
    store = copy_store(base, tmp_path / "store")
    with caplog.at_level(logging.WARNING):
        code, err = main_in_process("evaluate", "--store", store, "--checkpoint", other, "--workers", "0")
        assert code == 0, err
        code, err = main_in_process("train", "--store", store, "--name", "ft", "--init", other,
                                    "--epochs", "1", "--workers", "0")
        assert code == 0, err
    assert caplog.text.count("was trained on another store") == 2
