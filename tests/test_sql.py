"""`swift-sampler sql`: read-only queries over the store's views, clear errors."""

from __future__ import annotations

import json

import pytest

from swift_sampler.cli import main
from swift_sampler.storage import QueryError, query


def test_sql_counts_match_manifest(digits_store, capsys):
    manifest = json.loads((digits_store / "manifest.json").read_text())
    rc = main(["sql", str(digits_store),
               "SELECT split, count(*) AS n FROM samples GROUP BY split ORDER BY split", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    rows = [json.loads(line) for line in lines[:-1]]
    assert {r["split"]: r["n"] for r in rows} == {
        s: info["count"] for s, info in manifest["splits"].items()}
    assert json.loads(lines[-1])["rows"] == 3


def test_sql_table_output(digits_store, capsys):
    assert main(["sql", str(digits_store), "SELECT count(*) AS n FROM samples"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].strip() == "n" and out[2].strip() == "1797"


@pytest.mark.parametrize("sql, words", [
    ("SELEC * FROM samples", "syntax error"),
    ("SELECT * FROM nope", "unknown view 'nope'"),
    ("SELECT * FROM features", "build-features"),
    ("DROP VIEW samples", "read-only"),
    ("COPY samples TO '{tmp}/x.csv'", "read-only"),
    ("SELECT 1; SELECT 2", "exactly one"),
    ("SELECT * FROM read_csv('/etc/passwd')", "disabled"),
])
def test_sql_bad_queries_exit_2_with_message(digits_store, tmp_path, capsys, sql, words):
    rc = main(["sql", str(digits_store), sql.format(tmp=tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("order", [
    ("STORE", "--json", "QUERY"),
    ("STORE", "QUERY", "--json"),
    ("--json", "STORE", "QUERY"),
    ("--store", "STORE", "--json", "QUERY"),
    ("QUERY", "--json", "--store", "STORE"),
    ("STORE", "--limit", "5", "QUERY", "--json"),
])
def test_sql_takes_store_query_and_options_in_any_order(digits_store, capsys, order):
    words = {"STORE": str(digits_store), "QUERY": "SELECT count(*) AS n FROM samples"}
    assert main(["sql", *(words.get(w, w) for w in order)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[0]) == {"n": 1797} and json.loads(lines[-1])["rows"] == 1


def test_sql_on_missing_store(tmp_path, capsys):
    assert main(["sql", str(tmp_path / "none"), "SELECT 1"]) == 2
    assert "no store" in capsys.readouterr().err


def test_query_returns_arrow(digits_store):
    table = query(digits_store, "SELECT key, label FROM samples WHERE split = 'test' ORDER BY key")
    assert table.column_names == ["key", "label"] and table.num_rows > 0
    with pytest.raises(QueryError):
        query(digits_store, "DELETE FROM samples")
