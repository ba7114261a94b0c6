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


def test_a_sampler_file_of_another_store_is_refused_everywhere_unless_allowed(scored_digits, tmp_path):
    """One rule for a sampler file, as `train --sampler` applies it: learned on another store
    (or other features) it is refused by name, unless allowed; a Sampler object has no origin."""
    from swift_sampler.pipeline.sampler.file import SamplerFileError, save_sampler
    from swift_sampler.pipeline.sampler.image_weights import keep_by_tau
    from swift_sampler.storage import read_features_meta, read_manifest

    layout = StoreLayout(scored_digits)
    mine = {"store_id": read_manifest(layout)["store_id"],
            "features_checkpoint_sha256": read_features_meta(layout)["checkpoint_sha256"]}
    own = save_sampler(tmp_path / "own.json", step(scored_digits), mine)
    other_store = save_sampler(tmp_path / "store.json", step(scored_digits), {**mine, "store_id": "x"})
    other_features = save_sampler(tmp_path / "features.json", step(scored_digits),
                                  {**mine, "features_checkpoint_sha256": "0" * 64})
    expected = ss.sampler_weights(step(scored_digits), scored_digits).by_key()
    uses = {
        "sampler_weights": lambda f, **kw: ss.sampler_weights(f, scored_digits, **kw).by_key(),
        "keep_by_tau": lambda f, **kw: keep_by_tau(f, scored_digits, **kw).tau,
        "dropped": lambda f, **kw: dict(zip(*ss.dropped(f, scored_digits, **kw)
                                            .select(["key", "weight"]).to_pydict().values())),
        "train_model": lambda f, **kw: ss.train_model(scored_digits, None, sampler=f, epochs=1,
                                                      workers=0, progress=False, **kw),
    }
    for use in uses.values():
        for foreign, field in ((other_store, "store_id"), (other_features, "features_checkpoint_sha256")):
            with pytest.raises(SamplerFileError, match=rf"provenance\.{field}.*allow_foreign=True"):
                use(foreign)
    assert uses["sampler_weights"](own) == expected
    assert uses["keep_by_tau"](other_store, allow_foreign=True) == expected
    listed = uses["dropped"](other_features, allow_foreign=True)
    assert listed and listed == {k: w for k, w in expected.items() if w < max(expected.values())}
