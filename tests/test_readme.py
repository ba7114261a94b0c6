"""The README's Python blocks run as written, in a directory whose ``store`` is a small digits
store with a sampler file where a search writes it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import swift_sampler
from swift_sampler.pipeline.sampler.file import save_sampler
from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.table_store import load_tables
from swift_sampler.storage import StoreLayout, read_manifest

README = Path(__file__).resolve().parents[1] / "README.md"

# Blocks the suite does not run, by a line of each, and why.
NOT_RUN = {
    'ss.ingest("imagefolder:/data/train"': "needs the reader's image folder and trains for hours "
    "(a 40-step search); the package docstring walks the same steps on digits "
    "(test_api.py::test_package_docstring_walks_the_whole_method)",
}


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def runnable() -> list[str]:
    return [b for b in python_blocks() if not any(line in b for line in NOT_RUN)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """``store``: digits as ingested by default (one train shard), scored by an untrained
    digits-net, a step sampler at ``store/searches/ss/best_sampler.json``."""
    from swift_sampler.pipeline.features.build import build_features
    from swift_sampler.train.models import create_model

    root = tmp_path_factory.mktemp("readme")
    store = root / "store"
    swift_sampler.ingest("digits", store, noise="symmetric:0.4", val_frac=0.2, test_frac=0.2,
                         progress=False)
    torch.manual_seed(0)
    build_features(store, create_model("digits-net", 10, 1, 8), crops_per_image=2, workers=0,
                   progress=False, device="cpu", quantiles=32, angles=8)
    step = Sampler((0.0, 0.5, 0.5, 1.0, 1.0), (1.0, 1.0, 0.0, 0.0, 0.0), 1.0, 0.0, "cgf",
                   load_tables(store))
    path = store / "searches" / "ss" / "best_sampler.json"
    path.parent.mkdir(parents=True)
    save_sampler(path, step, {"store_id": read_manifest(StoreLayout(store))["store_id"]})
    return root


class KeyedDataset(torch.utils.data.Dataset):
    """``my_dataset`` of the README: the store's train images by key, in an order of its own
    (reversed); item ``i`` is ``i``, so a test can tell which images were drawn."""

    def __init__(self, store: Path) -> None:
        samples = pq.read_table(store / "samples.parquet", columns=["split", "key"]).to_pylist()
        self.keys = sorted((r["key"] for r in samples if r["split"] == "train"), reverse=True)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> int:
        return i


def test_every_python_block_is_run_or_said_why_not():
    blocks = python_blocks()
    assert len(blocks) >= 3
    for line in NOT_RUN:
        assert sum(line in b for b in blocks) == 1, f"README has no block with {line!r} any more"
    assert len(runnable()) == len(blocks) - len(NOT_RUN)


@pytest.mark.parametrize("block", runnable(), ids=lambda b: b.strip().splitlines()[-1][:40])
def test_readme_block_runs_as_written(block, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    if "my_dataset" in block:
        namespace["my_dataset"] = KeyedDataset(workdir / "store")
    torch.manual_seed(0)
    exec(compile(block, str(README), "exec"), namespace)

    weights = swift_sampler.sampler_weights(workdir / "store/searches/ss/best_sampler.json",
                                            workdir / "store").by_key()
    if "loader" in namespace and "my_dataset" in namespace:
        keys = namespace["my_dataset"].keys
        drawn = torch.cat(list(namespace["loader"])).tolist()
        assert len(drawn) == len(keys) and all(weights[keys[i]] > 0 for i in drawn)
    if "issues" in namespace:  # the list of what the sampler leaves out
        issues = namespace["issues"].to_pylist()
        assert issues and all(r["weight"] < max(weights.values()) for r in issues)
    if "images" in namespace:  # the WebDataset loop ran: one channel for digits, in [0, 1]
        images, labels = namespace["images"], namespace["labels"]
        assert images.dtype == torch.float32 and tuple(images.shape[1:]) == (1, 8, 8)
        assert 0 <= float(images.min()) and float(images.max()) <= 1
        assert len(labels) == len(images) and np.isin(np.asarray(labels), range(10)).all()
