"""One namespace: everything imports as ``swift_sampler.*``, nothing bare top-level.

A user's working directory often holds a ``train.py`` or ``search.py``; from such a folder the
package and its CLI must still work, and the wheel must hold ``swift_sampler`` alone.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BARE = ("pipeline", "search", "train", "storage")


def _run(code_or_args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_works_from_a_folder_with_shadowing_scripts(tmp_path):
    for name in ("train", "search", "pipeline", "storage"):
        (tmp_path / f"{name}.py").write_text("raise SystemExit('the user script was imported')\n")
    out = _run(["-m", "swift_sampler", "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "swift-sampler" in out.stdout
    out = _run(["-c", "import swift_sampler, swift_sampler.train.trainer, swift_sampler.search.run; "
                "print(swift_sampler.__name__)"], tmp_path)
    assert out.returncode == 0, out.stderr


def test_no_bare_stage_package_is_importable(tmp_path):
    for name in BARE:
        out = _run(["-c", f"import {name}"], tmp_path)
        assert out.returncode != 0 and "No module named" in out.stderr, (name, out.stdout, out.stderr)


def test_no_module_imports_a_bare_stage_package():
    # Also inside code strings (subprocess scripts): ``import os, pipeline.ingest.shards``.
    pattern = re.compile(rf"^\s*(from|import)\s+({'|'.join(BARE)})(\.|\s|$)"
                         rf"|^\s*import (?:[\w.]+, )*({'|'.join(BARE)})\.\w", re.M)
    offenders = []
    for folder in (*BARE, "swift_sampler", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_wheel_holds_swift_sampler_alone(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"swift_sampler"}
    for stage in BARE:
        assert f"swift_sampler/{stage}/__init__.py" in names


def test_bench_outside_a_checkout_says_where_the_benchmark_lives(monkeypatch, tmp_path, capsys):
    import swift_sampler.commands.bench as bench
    from swift_sampler.cli import main

    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path / "no-bench")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p).name != "bench"])
    for name in [m for m in sys.modules if m == "benchlib" or m.startswith("benchlib.")]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["bench", "noisy-cifar", "--tiny", "--out", str(tmp_path / "o")]) == 2
    assert "lives in bench/ of a checkout" in capsys.readouterr().err


def test_bench_script_finds_its_own_benchlib_whatever_package_it_runs_against(monkeypatch, tmp_path,
                                                                               capsys):
    # ``python bench/noisy_cifar.py`` puts bench/ on sys.path (here: pytest's pythonpath), so a
    # non-editable installation of the package, whose BENCH_DIR does not exist, still runs it.
    import swift_sampler.commands.bench as bench
    from swift_sampler.cli import main

    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path / "no-bench")
    with pytest.raises(SystemExit) as e:
        main(["bench", "noisy-cifar", "--help"])
    assert e.value.code == 0
    assert "--methods" in capsys.readouterr().out


def test_the_package_loads_its_api_on_first_use():
    import subprocess
    import sys

    code = ("import sys, swift_sampler.storage; "
            "assert 'swift_sampler.api' not in sys.modules, 'api imported eagerly'; "
            "import swift_sampler as ss; f = ss.train_model; "
            "assert 'swift_sampler.api' in sys.modules; "
            "assert set(ss.__all__) <= set(dir(ss)); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
