"""No feature, table, sampler or loader reads the noise ground truth: a store stripped of it
(``true_label``/``noisy`` gone from every ``KEY.json`` and from ``samples.parquet``, checksums
rewritten) gives identical features, tables, tau and trained weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from swift_sampler.pipeline.features.build import build_features
from swift_sampler.pipeline.ingest.shards import TarWriter, iter_tar
from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.table_store import load_tables
from swift_sampler.storage import StoreLayout, atomic_writer, read_manifest
from swift_sampler.storage.schemas import GROUND_TRUTH_COLUMNS
from swift_sampler.train.models import create_model
from swift_sampler.train.presets import resolve_config
from swift_sampler.train.sampling import create_sampler_hook
from swift_sampler.train.trainer import fit

POINT = np.array([0.3, 0.6, 0.8, 1.0, 0.9, 0.6, 0.2, 0.0, 1.0, 0.3])


def strip_ground_truth(src, dst) -> None:
    shutil.copytree(src, dst)
    layout = StoreLayout(dst)
    manifest = read_manifest(layout)
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            path = layout.shards_dir / shard["file"]
            samples = list(iter_tar(path))
            with atomic_writer(path) as f:
                writer = TarWriter(f)
                for key, parts in samples:
                    meta = json.loads(parts["json"])
                    for col in GROUND_TRUTH_COLUMNS:
                        meta.pop(col, None)
                    parts["json"] = json.dumps(meta).encode()
                    writer.add_sample({"__key__": key, **parts})
                writer.close()
            shard.update(bytes=writer.bytes, sha256=writer.sha.hexdigest())
    with atomic_writer(layout.manifest, "w") as f:
        json.dump(manifest, f)
    table = pq.read_table(layout.samples)
    for col in GROUND_TRUTH_COLUMNS:
        i = table.schema.get_field_index(col)
        table = table.set_column(i, col, pa_nulls(table.num_rows, table.schema.field(col).type))
    pq.write_table(table, layout.samples)


def pa_nulls(n, type_):
    return pa.nulls(n, type=type_)


def run_everything(store):
    torch.manual_seed(0)
    model = create_model("digits-net", 10, in_chans=1, image_size=8)
    build_features(store, model, crops_per_image=3, seed=0, checkpoint_sha256="fixed",
                   progress=False, quantiles=64, angles=36)
    parts = StoreLayout(store).feature_parts()
    rows = pa.concat_tables([pq.read_table(p) for p in parts]).replace_schema_metadata(None)
    rows = rows.sort_by([("index", "ascending"), ("crop", "ascending")])
    tables = load_tables(store)
    sampler = Sampler.from_point(POINT, tables, "cgf")
    tau = sampler.tau(rows["loss"].to_numpy(), rows["entropy_r"].to_numpy())
    config = resolve_config(str(store), preset="digits", epochs=1, workers=0, progress=False,
                            val_split=None)
    trained = fit(config, sampler=create_sampler_hook(store, sampler, features="store", seed=0))
    # A named run records its training dynamics: from the given labels alone.
    named = resolve_config(str(store), preset="digits", name="dyn", epochs=2, workers=0,
                           progress=False, val_split=None)
    fit(named)
    dynamics = pq.read_table(StoreLayout(store).run("dyn") / "dynamics.parquet")
    return rows, tables, tau, trained.model.state_dict(), dynamics


@pytest.mark.slow
def test_results_do_not_depend_on_ground_truth(digits_store, tmp_path):
    full, blind = tmp_path / "full", tmp_path / "blind"
    shutil.copytree(digits_store, full)
    strip_ground_truth(digits_store, blind)
    assert "true_label" not in next(iter_tar(StoreLayout(blind).shards("train")[0]))[1]["json"].decode()

    rows_a, tables_a, tau_a, weights_a, dynamics_a = run_everything(full)
    rows_b, tables_b, tau_b, weights_b, dynamics_b = run_everything(blind)
    assert dynamics_a.equals(dynamics_b)

    assert rows_a.equals(rows_b)
    assert tables_a == tables_b
    np.testing.assert_array_equal(tau_a, tau_b)
    assert weights_a.keys() == weights_b.keys()
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k
