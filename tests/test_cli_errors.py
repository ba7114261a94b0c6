"""The CLI reports the project's own errors as one line (exit 2) and lets bugs keep their
traceback; the loader skips damaged samples but not code errors."""

from __future__ import annotations

import json

import pytest

from swift_sampler import cli
from swift_sampler.pipeline.ingest.decode import CorruptSampleError
from swift_sampler.storage import StoreError, UsageError
from swift_sampler.train.loader import decode_samples, parse_sample


def _with_command(monkeypatch, error):
    def boom(args):
        raise error

    real = cli.build_parser

    def parser():
        p = real()
        p.set_defaults(func=boom)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)


@pytest.mark.parametrize("error", [UsageError("--steps must be >= 1"), StoreError("no store here")])
def test_project_errors_are_one_line_and_exit_2(monkeypatch, capsys, error):
    _with_command(monkeypatch, error)
    assert cli.main([]) == 2
    assert capsys.readouterr().err.strip() == f"error: {error}"


@pytest.mark.parametrize("error", [ValueError("operands could not be broadcast together"),
                                   KeyError("trials_path"), TypeError("bad operand")])
def test_a_bug_is_not_dressed_up_as_a_user_mistake(monkeypatch, error):
    _with_command(monkeypatch, error)
    with pytest.raises(type(error)):
        cli.main([])


def test_every_command_module_is_imported_plainly():
    import importlib

    for name in cli.COMMAND_MODULES:
        importlib.import_module(f"swift_sampler.commands.{name}")  # a missing one fails here
    assert "sampler" not in cli.COMMAND_MODULES


def _raw(**fields):
    return {"__key__": "k", "png": b"\x89PNG not really", **fields}


@pytest.mark.parametrize("raw", [
    _raw(json=b"{not json"), _raw(json=b"[1, 2]"), _raw(json=json.dumps({"label": 1}).encode()),
    _raw(json=json.dumps({"index": "x", "label": 1}).encode()), {"__key__": "k", "json": b"{}"},
])
def test_damaged_samples_are_corrupt_sample_errors(raw):
    with pytest.raises(CorruptSampleError):
        parse_sample(raw, channels=1)


def test_a_code_error_in_parsing_is_not_skipped(monkeypatch):
    import swift_sampler.train.loader as loader

    def broken(data, channels):
        raise TypeError("a bug in the decoder")

    monkeypatch.setattr(loader, "decode", broken)
    raw = _raw(json=json.dumps({"index": 0, "label": 1}).encode())
    with pytest.raises(TypeError, match="a bug"):
        list(decode_samples(iter([raw]), channels=1, skipped=[]))
