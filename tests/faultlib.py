"""Helpers for fault tests: run the CLI as a real process, SIGKILL it at chosen points, rerun it,
and check the invariants a store must keep after any crash.

Kills are real: the command runs in its own session (process group) and the whole group gets
SIGKILL (loader workers included), as the kernel's OOM killer or a lost machine would do. A kill
point is a condition polled on the store folder (the k-th shard, part, trial or metrics line
exists), optionally followed by a short random delay so the kill lands mid-write.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from swift_sampler.storage import StoreLayout, read_manifest, verify_shards
from swift_sampler.storage.atomic import TMP_PREFIX

CLI = (sys.executable, "-m", "swift_sampler")
REPO = Path(__file__).resolve().parents[1]
# One thread per process: the fault tests start many processes on a shared machine, and the
# interrupted and the uninterrupted runs must see the same thread count to compare bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SWIFT_SAMPLER_LOG": "INFO",
       "PYTHONPATH": str(REPO)}
ENV.pop("SWIFT_SAMPLER_DEBUG", None)


@dataclass
class Result:
    """A finished (or killed) CLI process."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    killed: bool = False

    def summary(self) -> dict:
        """The one-line JSON summary every command prints last."""
        lines = [ln for ln in self.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise AssertionError(f"no JSON summary in stdout of {self.describe()}")
        return json.loads(lines[-1])

    def describe(self) -> str:
        return (f"`swift-sampler {' '.join(self.args)}` -> {self.returncode}\n"
                f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}")


class Running:
    """A CLI process started in its own session; output goes to temporary files."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.args = tuple(str(a) for a in args)
        self._out = tempfile.TemporaryFile("w+")
        self._err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([*CLI, *self.args], stdout=self._out, stderr=self._err,
                                     env=env or ENV, cwd=REPO, start_new_session=True)
        self.started = time.monotonic()
        self.killed = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (the command and any loader workers)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.killed = True
        self.proc.wait()

    def wait(self, timeout: float = 600) -> Result:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"`swift-sampler {' '.join(self.args)}` ran past {timeout} s") from None
        self._out.seek(0)
        self._err.seek(0)
        result = Result(self.args, self.proc.returncode, self._out.read(), self._err.read(), self.killed)
        self._out.close()
        self._err.close()
        return result

    def kill_when(self, condition: Callable[[], bool], *, delay: float = 0.0,
                  timeout: float = 600, poll: float = 0.002) -> bool:
        """Poll ``condition`` until it holds, wait ``delay`` s, SIGKILL; True if the kill landed
        while the process was still running (False: it finished first)."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            if condition():
                if delay:
                    time.sleep(delay)
                landed = self.alive()
                self.kill()
                return landed
            time.sleep(poll)
        if self.alive():
            self.kill()
            raise AssertionError(f"kill condition never held within {timeout} s")
        return False

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc) -> None:
        # Never leave a process behind, whatever the test did.
        if self.alive():
            self.kill()
        for f in (self._out, self._err):
            if not f.closed:
                f.close()


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> Result:
    """Run ``swift-sampler ARGS`` to the end and return its outcome."""
    with Running(*args, env=env) as r:
        return r.wait(timeout)


def run_in_process(*args: str) -> int:
    """Run the same command line inside this process (a cheap uninterrupted reference run),
    with one intra-op thread like the subprocesses, so results compare bit for bit."""
    import contextlib
    import io

    import torch

    from swift_sampler.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def run_ok(*args: str, timeout: float = 600) -> Result:
    result = run_cli(*args, timeout=timeout)
    assert result.returncode == 0, result.describe()
    return result


def assert_user_error(result: Result, *needles: str) -> None:
    """Exit code 2, a one-line ``error: ...`` on stderr naming ``needles``, no traceback."""
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert "error:" in result.stderr, result.describe()
    low = result.stderr.lower()
    for needle in needles:
        assert needle.lower() in low, f"{needle!r} not in stderr:\n{result.describe()}"


# -- tiny stores -------------------------------------------------------------------------------

# One tiny digits store layout for every fault test: 400 images, 20 per shard, so that there are
# many shards (16 train) and hence many points at which to kill a stage.
INGEST = {"source": "digits", "limit": 400, "shard_size": 20, "noise": "symmetric:0.4", "seed": 3,
          "val_frac": 0.1, "test_frac": 0.1}
_BASE: dict[str, Path] = {}


def ingest_args(store: str | Path, **override) -> list[str]:
    """The CLI arguments that build the same store as ``base_store``."""
    opts = {**INGEST, **override}
    args = ["pipeline", "ingest", "--store", str(store)]
    for key, value in opts.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return [*args, "--json"]


def base_store(tmp_path_factory) -> Path:
    """The reference store (ingested in-process once per session); copy it before changing it."""
    if "digits" not in _BASE:
        from swift_sampler.pipeline.ingest.build import ingest

        root = tmp_path_factory.mktemp("fault-base") / "store"
        ingest(INGEST["source"], root, **{k: v for k, v in INGEST.items() if k != "source"},
               progress=False)
        _BASE["digits"] = root
    return _BASE["digits"]


def copy_store(src: str | Path, dst: str | Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock-*"))
    return Path(dst)


def make_checkpoint(store: str | Path, path: str | Path, *, seed: int = 0) -> Path:
    """A digits-net checkpoint for ``store`` (seeded initial weights; training is not needed to
    test what the stages do with it)."""
    import torch

    from swift_sampler.train.checkpoint import save_checkpoint
    from swift_sampler.train.models import create_model

    manifest = read_manifest(StoreLayout(store))
    torch.manual_seed(seed)
    model = create_model("digits-net", len(manifest["classes"]), manifest["image"]["channels"],
                         manifest["image"]["height"])
    save_checkpoint(path, model, epoch=0, store_id=manifest["store_id"], config={})
    return Path(path)


# -- kill points -------------------------------------------------------------------------------

def files_at_least(folder: str | Path, pattern: str, k: int) -> Callable[[], bool]:
    """True once ``folder`` (searched recursively) holds ``k`` files matching ``pattern``."""
    folder = Path(folder)

    def check() -> bool:
        try:
            return sum(1 for p in folder.rglob(pattern) if not p.name.startswith(TMP_PREFIX)) >= k
        except OSError:  # a staging folder renamed under our feet
            return False

    return check


def lines_at_least(path: str | Path, k: int) -> Callable[[], bool]:
    path = Path(path)

    def check() -> bool:
        try:
            return sum(1 for ln in path.read_text().splitlines() if ln.strip()) >= k
        except OSError:
            return False

    return check


def parquet_rows_at_least(path: str | Path, k: int) -> Callable[[], bool]:
    path = Path(path)

    def check() -> bool:
        try:
            return pq.read_metadata(path).num_rows >= k
        except (OSError, pa.ArrowException):
            return False

    return check


def exists(path: str | Path) -> Callable[[], bool]:
    return Path(path).exists


# -- invariants --------------------------------------------------------------------------------

def temporaries(root: str | Path) -> list[str]:
    """Leftover ``.tmp-*`` files or folders anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob(TMP_PREFIX + "*"))


def digests(folder: str | Path, pattern: str = "*") -> dict[str, str]:
    """{relative path: sha256} of the files under ``folder`` matching ``pattern``."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob(pattern)) if p.is_file()}


def check_store(store: str | Path) -> dict:
    """A complete, consistent store: checksums match, sample counts agree everywhere.

    Returns the manifest.
    """
    from swift_sampler.pipeline.ingest.shards import iter_tar

    layout = StoreLayout(store)
    manifest = read_manifest(layout)
    assert verify_shards(layout, manifest) == [], verify_shards(layout, manifest)
    listed = {s["file"] for info in manifest["splits"].values() for s in info["shards"]}
    on_disk = {p.name for p in layout.shards_dir.glob("*.tar")}
    assert on_disk == listed, f"shards on disk {sorted(on_disk ^ listed)} differ from the manifest"
    samples = pq.read_table(layout.samples)
    for split, info in manifest["splits"].items():
        assert sum(s["count"] for s in info["shards"]) == info["count"]
        rows = samples.filter(pc.equal(samples["split"], split))
        assert rows.num_rows == info["count"], (split, rows.num_rows, info["count"])
        assert sorted(rows["index"].to_pylist()) == list(range(info["count"]))
        for s in info["shards"]:
            n = sum(1 for _ in iter_tar(layout.shards_dir / s["file"]))
            assert n == s["count"], (s["file"], n, s["count"])
    return manifest


def read_features(store: str | Path) -> pa.Table:
    """All feature rows, sorted by (index, crop)."""
    parts = StoreLayout(store).feature_parts()
    table = pa.concat_tables([pq.read_table(p) for p in parts]).replace_schema_metadata(None)
    return table.sort_by([("index", "ascending"), ("crop", "ascending")])


def check_features(store: str | Path, crops_per_image: int) -> pa.Table:
    """Exactly N x K rows with unique (index, crop) covering every train index; features.json
    says done. Returns the rows sorted."""
    layout = StoreLayout(store)
    manifest = read_manifest(layout)
    n = manifest["splits"]["train"]["count"]
    table = read_features(store)
    assert table.num_rows == n * crops_per_image, (table.num_rows, n, crops_per_image)
    keys = table["index"].to_numpy().astype(np.int64) * crops_per_image + table["crop"].to_numpy()
    assert np.array_equal(keys, np.arange(n * crops_per_image)), "(index, crop) not exactly N x K"
    meta = json.loads(layout.features_meta.read_text())
    assert meta["done"] is True and meta["rows"] == n * crops_per_image
    return table


def search_trials(store: str | Path, name: str) -> list[dict]:
    path = StoreLayout(store).search(name) / "trials.parquet"
    return pq.read_table(path).to_pylist() if path.is_file() else []


def check_trials(store: str | Path, name: str, steps: int | None = None) -> list[dict]:
    """Trials numbered 0..n-1 exactly once, every one finished (status ok/failed, finite score)."""
    trials = search_trials(store, name)
    numbers = [t["trial"] for t in trials]
    assert numbers == list(range(len(trials))), f"trials out of order or repeated: {numbers}"
    for t in trials:
        assert t["status"] in ("ok", "failed"), t
        assert np.isfinite(t["score"]), t
        assert len(t["point"]) == 10, t
    if steps is not None:
        assert len(trials) == steps, (len(trials), steps)
    return trials


def comparable_trials(trials: list[dict]) -> list[dict]:
    """Trials without wall-clock fields, for comparing two runs."""
    return [{k: v for k, v in t.items() if k not in ("seconds",)} for t in trials]


def state_dict_equal(a: dict, b: dict) -> list[str]:
    """Names of the tensors that differ between two state dicts (empty: identical)."""
    import torch

    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def main_in_process(*args) -> tuple[int, str]:
    """The CLI in this process (same code path as the console script); (exit code, stderr)."""
    from swift_sampler.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()
