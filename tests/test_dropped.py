"""``ss.dropped``: the images a sampler drops or down-weights, least kept first, from the
samples table and the sampler's weights alone (never the noise ground truth)."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import swift_sampler as ss
from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.table_store import load_tables
from swift_sampler.storage import StoreLayout
from swift_sampler.storage.errors import UsageError
from swift_sampler.storage.schemas import GROUND_TRUTH_COLUMNS


def step(store) -> Sampler:
    return Sampler((0.0, 0.5, 0.5, 1.0, 1.0), (1.0, 1.0, 0.0, 0.0, 0.0), 1.0, 0.0, "cgf",
                   load_tables(store))


def slow_dropped(store, sampler, below=None) -> list[dict]:
    """Reference: the samples file read row by row, a sort in Python."""
    weights = ss.sampler_weights(sampler, store)
    by_key = weights.by_key()
    limit = max(by_key.values()) if below is None else below
    rows = [dict(index=r["index"], key=r["key"], source=r["source"], label=r["label"],
                 weight=by_key[r["key"]])
            for r in pq.read_table(StoreLayout(store).samples).to_pylist() if r["split"] == "train"]
    return sorted((r for r in rows if r["weight"] < limit), key=lambda r: (r["weight"], r["index"]))


def test_dropped_lists_the_down_weighted_images_least_kept_first(scored_digits):
    table = ss.dropped(step(scored_digits), scored_digits)
    assert table.schema == pa.schema([("index", pa.int64()), ("key", pa.string()),
                                      ("source", pa.string()), ("label", pa.int32()),
                                      ("weight", pa.float64())])
    assert table.to_pylist() == slow_dropped(scored_digits, step(scored_digits))
    weights = table.column("weight").to_pylist()
    assert 0 < table.num_rows < len(ss.sampler_weights(step(scored_digits), scored_digits).keys)
    assert weights[0] == 0 and max(weights) < 1  # the step keeps its favourites with weight 1
    assert all(s.startswith("digits:") for s in table.column("source").to_pylist())

    never = ss.dropped(step(scored_digits), scored_digits, below=1e-9)
    assert never.to_pylist() == slow_dropped(scored_digits, step(scored_digits), below=1e-9)
    assert 0 < never.num_rows < table.num_rows and set(never.column("weight").to_pylist()) == {0}
    for bad in (0, -1, float("nan"), "0.5"):
        with pytest.raises(UsageError, match="below must be a positive number"):
            ss.dropped(step(scored_digits), scored_digits, below=bad)


def test_dropped_never_reads_the_noise_ground_truth(scored_digits, tmp_path):
    blind = tmp_path / "store"
    shutil.copytree(scored_digits, blind)
    samples = pq.read_table(StoreLayout(blind).samples)
    assert set(GROUND_TRUTH_COLUMNS) <= set(samples.column_names)
    pq.write_table(samples.drop_columns(list(GROUND_TRUTH_COLUMNS)), StoreLayout(blind).samples)
    assert (ss.dropped(step(blind), blind).to_pylist()
            == ss.dropped(step(scored_digits), scored_digits).to_pylist())
