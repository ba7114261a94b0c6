"""Untrusted files and input: checkpoints never run code, `sql` never writes, sampler files and
configs are data, and no name or path from a file makes a stage write outside its store."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from faultlib import (
    assert_user_error,
    base_store,
    copy_store,
    main_in_process,
    make_checkpoint,
    run_cli,
)

from swift_sampler.storage import (
    QueryError,
    StoreError,
    StoreLayout,
    check_name,
    query,
    read_manifest,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return base_store(tmp_path_factory)




# -- checkpoints -------------------------------------------------------------------------------

class _RunsCode:
    """Unpickling this calls ``os.system``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoints(tmp_path: Path) -> tuple[Path, list[Path]]:
    marker = tmp_path / "code-ran"
    zipped = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_name": "digits-net", "num_classes": 10, "in_chans": 1,
                "image_size": 8, "payload": _RunsCode(marker)}, zipped)
    legacy = tmp_path / "evil-legacy.pt"  # the pre-zip pickle format torch.load also reads
    torch.save({"model": _RunsCode(marker)}, legacy, _use_new_zipfile_serialization=False)
    return marker, [zipped, legacy]


def test_checkpoint_that_runs_code_is_refused_in_process(tmp_path):
    from swift_sampler.train.checkpoint import CheckpointError, load_checkpoint, load_model

    marker, paths = _evil_checkpoints(tmp_path)
    for path in paths:
        with pytest.raises(CheckpointError, match="cannot read checkpoint"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError):
            load_model(path)
    assert not marker.exists(), "unpickling a checkpoint ran code"


def test_checkpoint_that_runs_code_is_refused_by_every_command(base, tmp_path):
    marker, (evil, legacy) = _evil_checkpoints(tmp_path)
    store = copy_store(base, tmp_path / "store")
    # A real process once (exit code and stderr as a user sees them) ...
    assert_user_error(run_cli("evaluate", "--store", store, "--checkpoint", evil, "--json"),
                      "cannot read checkpoint")
    # ... and every other command that reads a checkpoint through the same entry point.
    for args in (("pipeline", "build-features", "--store", store, "--checkpoint", legacy),
                 ("train", "--store", store, "--name", "x", "--init", evil, "--epochs", "1")):
        code, err = main_in_process(*args)
        assert code == 2 and "cannot read checkpoint" in err and "Traceback" not in err, err
    # A checkpoint planted in a run folder is refused on --resume as well.
    run = StoreLayout(store).run("planted")
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(evil.read_bytes())
    code, err = main_in_process("train", "--store", store, "--name", "planted", "--resume", "--epochs", "1",
                                "--workers", "0")
    assert code == 2 and "cannot read checkpoint" in err, err
    assert not marker.exists(), "unpickling a checkpoint ran code"
    assert not (store / "features").exists()


def test_genuine_checkpoint_still_loads(base, tmp_path):
    # The refusal above is not a refusal of everything: a real checkpoint round-trips.
    from swift_sampler.train.checkpoint import load_model

    path = make_checkpoint(base, tmp_path / "ok.pt")
    model, meta = load_model(path)
    assert meta["model_name"] == "digits-net" and model.head.out_features == 10


# -- sql is read-only --------------------------------------------------------------------------

REFUSED = [
    "DROP VIEW samples",
    "CREATE TABLE t AS SELECT 1",
    "COPY (SELECT * FROM samples) TO '{out}/copy.csv'",
    "COPY (SELECT * FROM samples) TO '{store}/copy.csv'",
    "ATTACH '{out}/x.db' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "EXPORT DATABASE '{out}/export'",
    "SET enable_external_access = true",
    "PRAGMA enable_profiling",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_csv('{store}/../outside.csv')",
    "SELECT 1; DROP VIEW samples",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{out}/explain.csv'",
]


@pytest.fixture()
def sql_store(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "outside.csv").write_text("secret,1\n")
    return store, out


@pytest.mark.parametrize("sql", REFUSED)
def test_sql_refuses_writes_and_reads_outside_the_store(sql_store, sql):
    store, out = sql_store
    before = sorted(p.name for p in store.iterdir())
    with pytest.raises(QueryError):
        query(store, sql.format(store=store, out=out))
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in store.iterdir()) == before
    # The views still answer afterwards.
    assert query(store, "SELECT count(*) AS n FROM samples")["n"][0].as_py() == 400


def test_sql_explain_analyze_cannot_write_into_the_store(sql_store):
    store, _ = sql_store
    manifest = (store / "manifest.json").read_bytes()
    with contextlib.suppress(QueryError):
        query(store, f"EXPLAIN ANALYZE COPY (SELECT 'x' AS junk) TO '{store}/manifest.json' (FORMAT csv)")
    assert (store / "manifest.json").read_bytes() == manifest


def test_sql_cli_refusal_is_a_clean_error(sql_store):
    store, out = sql_store
    code, err = main_in_process("sql", store, f"COPY (SELECT * FROM samples) TO '{out}/x.csv'")
    assert code == 2 and "read-only" in err and "Traceback" not in err, err
    assert list(out.iterdir()) == []


# -- sampler files and configs are data --------------------------------------------------------

def _uniform_doc() -> dict:
    from swift_sampler.pipeline.sampler.file import sampler_to_dict
    from swift_sampler.pipeline.sampler.function import uniform_sampler

    return sampler_to_dict(uniform_sampler(None), {"store_id": "x"})


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(transform="__import__('os').system('touch {marker}')"), "transform"),
    (lambda d: d["parameters"].update(c1="__import__('os').system('touch {marker}')"), "c1"),
    (lambda d: d["parameters"].update(e1=2.0), "e1"),
    (lambda d: d.update(format="pickle"), "format"),
    (lambda d: d["parameters"].update(evil=1.0), "unknown"),
])
def test_sampler_file_fields_are_validated_never_evaluated(tmp_path, mutate, field):
    from swift_sampler.pipeline.sampler.file import SamplerFileError, load_sampler

    marker = tmp_path / "code-ran"
    doc = _uniform_doc()
    mutate(doc)
    text = json.dumps(doc).replace("{marker}", str(marker))
    path = tmp_path / "best_sampler.json"
    path.write_text(text)
    with pytest.raises(SamplerFileError, match=field):
        load_sampler(path)
    assert not marker.exists()


def test_sampler_file_with_nan_or_garbage_is_refused(tmp_path):
    from swift_sampler.pipeline.sampler.file import SamplerFileError, load_sampler

    path = tmp_path / "s.json"
    path.write_text(json.dumps(_uniform_doc()).replace('"v0": 1.0', '"v0": NaN'))
    with pytest.raises(SamplerFileError, match="NaN"):
        load_sampler(path)
    path.write_bytes(b"\x80\x04\x95 not json")  # a pickle is not a sampler file
    with pytest.raises(SamplerFileError, match="not valid JSON"):
        load_sampler(path)
    path.write_text("[" * 100_000 + "]" * 100_000)  # deeper than the parser's stack
    with pytest.raises(SamplerFileError, match="nests too deeply"):
        load_sampler(path)


# -- nothing written outside the store ---------------------------------------------------------

@pytest.mark.parametrize("name", ["../evil.tar", "/etc/passwd", "sub/train-000000.tar",
                                  "train-000000.tar/../../x.tar"])
def test_manifest_shard_names_cannot_leave_shards_dir(base, tmp_path, name):
    store = copy_store(base, tmp_path / "store")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = name
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="bad shard file name"):
        read_manifest(StoreLayout(store))


def test_manifest_with_escaping_shard_name_stops_each_stage(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = "../../escape.tar"
    (store / "manifest.json").write_text(json.dumps(manifest))
    ckpt = make_checkpoint(base, tmp_path / "w.pt")
    for args in (("pipeline", "build-features", "--store", store, "--checkpoint", ckpt),
                 ("train", "--store", store, "--name", "r", "--epochs", "1", "--workers", "0")):
        code, err = main_in_process(*args)
        assert code == 2 and "bad shard file name" in err, err
    assert not (tmp_path / "escape.tar").exists()
    assert not (store / "features").exists() and not (store / "runs").exists()


@pytest.mark.parametrize("name", ["../outside", "a/b", "/tmp/abs", "..", ".hidden", "x" * 200, ""])
def test_run_and_search_names_cannot_leave_the_store(base, tmp_path, name):
    layout = StoreLayout(base)
    for make in (layout.run, layout.search, check_name):
        with pytest.raises(StoreError, match="invalid"):
            make(name)


def test_train_with_escaping_run_name_is_refused(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    code, err = main_in_process("train", "--store", store, "--name", "../../outside", "--epochs", "1",
                                "--workers", "0")
    assert code == 2 and "invalid run name" in err, err
    assert not (tmp_path / "outside").exists() and not (store / "runs").exists()


def test_search_with_escaping_name_is_refused(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    ckpt = make_checkpoint(base, tmp_path / "w.pt")
    code, err = main_in_process("search", "run", "--store", store, "--checkpoint", ckpt,
                                "--name", "../outside", "--steps", "1")
    assert code == 2 and "invalid search name" in err, err
    assert not (tmp_path / "outside").exists()


def test_search_options_the_start_ignores_are_refused(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    ckpt = make_checkpoint(base, tmp_path / "w.pt")
    for flags in (["--schedule", "constant"], ["--lr-fraction", "0.5"],
                  ["--start", "early", "--lr-fraction", "0.5"]):
        code, err = main_in_process("search", "run", "--store", store, "--checkpoint", ckpt,
                                    "--name", "s", *flags)
        assert code == 2 and "only shape the fine-tune of --start final" in err, (flags, err)
    assert not (Path(store) / "searches").exists()
