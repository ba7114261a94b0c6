"""DuckDB catalog over a store: one in-memory database whose views read the store's files.

Views (each exists once the stage that writes its files has run):
``samples`` (ingest), ``feature_parts`` (build-features: the Parquet parts as written, one row
per crop), ``dynamics`` (build-features: per-image training dynamics of the checkpoint's run),
``features`` (``feature_parts`` joined with ``samples`` and ``dynamics``, plus each feature's cdf),
``cdf`` and ``cgf`` (tables), ``trials`` (search runs, with a ``search`` column), ``metrics``
(training runs, with a ``run`` column).

The stages read the store the same way (``read_view``: one query, Arrow out), so what a
search or the sampler stage sees is what a user's SQL shows, and DuckDB can aggregate a store
larger than memory.

The catalog is read-only: user SQL may only be one query (``SELECT``, ``WITH``, ``DESCRIBE``,
``SHOW``, ``SUMMARIZE``, or ``EXPLAIN [ANALYZE]`` of a query), and DuckDB's file access is
limited to the store.
"""

from __future__ import annotations

import re

import duckdb
import pyarrow as pa

from .arguments import check_argument
from .errors import SwiftSamplerError
from .layout import StoreLayout

VIEWS = ("samples", "feature_parts", "dynamics", "features", "cdf", "cgf", "trials", "metrics")
_EXPLAIN = re.compile(r"^\s*explain\s+(analyze\s+)?", re.IGNORECASE)


class QueryError(SwiftSamplerError, ValueError):
    """User SQL was rejected or failed; the message says why."""


def _lit(path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _view_sql(layout: StoreLayout) -> dict[str, str]:
    views = {}
    if layout.samples.is_file():
        views["samples"] = f"SELECT * FROM read_parquet({_lit(layout.samples)})"
    if layout.dynamics.is_file():
        views["dynamics"] = f"SELECT * FROM read_parquet({_lit(layout.dynamics)})"
    if layout.feature_parts():
        parts = _lit(layout.features_dir / "part-*.parquet")
        views["feature_parts"] = f"SELECT * FROM read_parquet({parts})"
        # cdf_* are the empirical cdf of each feature over all crops (equation 7); each crop
        # row carries its image's training dynamics when the store has them.
        dynamics = ", d.* EXCLUDE (\"index\")" if "dynamics" in views else ""
        join = ("LEFT JOIN dynamics d ON d.\"index\" = f.\"index\""
                if "dynamics" in views else "")
        views["features"] = f"""
            SELECT f.*, s.key, s.source, s.true_label, s.noisy{dynamics},
                   cume_dist() OVER (ORDER BY f.loss) AS cdf_loss,
                   cume_dist() OVER (ORDER BY f.entropy_r) AS cdf_entropy_r
            FROM feature_parts f
            LEFT JOIN samples s ON s.split = 'train' AND s."index" = f."index"
            {join}
        """
    if layout.cdf_table.is_file():
        views["cdf"] = f"SELECT * FROM read_parquet({_lit(layout.cdf_table)})"
    if layout.cgf_table.is_file():
        views["cgf"] = f"SELECT * FROM read_parquet({_lit(layout.cgf_table)})"
    if list(layout.searches_dir.glob("*/trials.parquet")):
        glob = _lit(layout.searches_dir / "*" / "trials.parquet")
        views["trials"] = (
            "SELECT regexp_extract(filename, '([^/]+)/trials\\.parquet$', 1) AS search, "
            f"* EXCLUDE (filename) FROM read_parquet({glob}, filename = true, union_by_name = true)"
        )
    if list(layout.runs_dir.glob("*/metrics.jsonl")):
        glob = _lit(layout.runs_dir / "*" / "metrics.jsonl")
        views["metrics"] = (
            "SELECT regexp_extract(filename, '([^/]+)/metrics\\.jsonl$', 1) AS run, "
            f"* EXCLUDE (filename) FROM read_json_auto({glob}, filename = true)"
        )
    return views


# Views of a connection that could not be defined (a damaged file): name -> why. A query that
# uses one gets that reason; the other views keep working.
_BROKEN: dict[int, dict[str, str]] = {}


def connect(store) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the store's views defined.

    A view whose files cannot be read (a cut Parquet part) is left out and remembered, so that
    ``query`` names the damaged file when a query uses it, while the other views keep working.
    """
    layout = StoreLayout(store).require()
    con = duckdb.connect(":memory:")
    broken = {}
    for name, sql in _view_sql(layout).items():
        try:
            con.execute(f"CREATE VIEW {name} AS {sql}")
        except duckdb.Error as e:
            # A view built on a broken one (features on feature_parts) fails for the same
            # reason: report that reason, which names the damaged file.
            uses = [why for dep, why in broken.items() if re.search(rf"\b{dep}\b", sql)]
            broken[name] = uses[0] if uses else str(e).splitlines()[0]
    _BROKEN[id(con)] = broken
    # From here on DuckDB may read the store and nothing else, and may write nowhere.
    con.execute(f"SET allowed_directories = [{_lit(layout.root)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def available_views(store) -> list[str]:
    return list(_view_sql(StoreLayout(store).require()))


def query(store, sql: str, *, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Run one read-only query over the store's views and return it in full as Arrow."""
    check_argument("query", sql, str, where="sql")
    _check_read_only(sql)
    own = con is None
    con = con or connect(store)
    try:
        for name, why in _BROKEN.get(id(con), {}).items():
            if re.search(rf"\b{name}\b", sql, re.IGNORECASE):
                raise QueryError(f"view {name!r} cannot be read: {why}; run the stage that "
                                 "writes it again (build-features rescores a damaged part)")
        # con.sql gives a relation that converts to Arrow without the DB-API copy.
        rel = con.sql(sql)
        return rel.to_arrow_table() if rel is not None else pa.table({})
    except duckdb.CatalogException as e:
        missing = re.search(r"Table with name (\w+) does not exist", str(e))
        if missing:
            name = missing.group(1)
            have = ", ".join(available_views(store)) or "none"
            hint = _MISSING_HINT.get(name, "")
            raise QueryError(f"unknown view {name!r} (available: {have}){hint}") from None
        raise QueryError(str(e).splitlines()[0]) from None
    except duckdb.Error as e:
        raise QueryError(str(e).splitlines()[0]) from None
    finally:
        if own:
            _BROKEN.pop(id(con), None)
            con.close()


def read_view(store, view: str, columns, *, where: str = "", order_by: str = "") -> pa.Table:
    """``SELECT columns FROM view [WHERE where] [ORDER BY order_by]`` over the store's
    catalog, as Arrow.

    Without ``order_by`` rows keep the order of the files (part by part, as written): DuckDB
    preserves insertion order for a plain scan. ``where`` and ``order_by`` are SQL written by
    the calling stage, never user input.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r} (expected one of {', '.join(VIEWS)})")
    sql = f"SELECT {', '.join(_ident(c) for c in columns)} FROM {view}"
    if where:
        sql += f" WHERE {where}"
    if order_by:
        sql += f" ORDER BY {order_by}"
    return query(store, sql)


def literal(value: str) -> str:
    """``value`` as a SQL string literal (for a stage's own ``where``)."""
    return _lit(value)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_MISSING_HINT = {
    "feature_parts": "; run `swift-sampler pipeline build-features` first",
    "features": "; run `swift-sampler pipeline build-features` first",
    "dynamics": "; run `swift-sampler pipeline build-features` with the checkpoint of a run "
                "that recorded them (any `train` run does)",
    "cdf": "; run `swift-sampler pipeline build-features` first",
    "cgf": "; run `swift-sampler pipeline build-features` first",
    "trials": "; run `swift-sampler search run` first",
    "metrics": "; run `swift-sampler train` first",
}


def _check_read_only(sql: str) -> None:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(str(e).splitlines()[0]) from None
    if len(statements) != 1:
        raise QueryError(f"expected exactly one SQL statement, got {len(statements)}")
    kind = statements[0].type.name
    if kind == "EXPLAIN":
        # EXPLAIN ANALYZE runs its statement: what it explains must be a query as well.
        _check_read_only(_EXPLAIN.sub("", sql, count=1))
        return
    # DESCRIBE, SHOW, SUMMARIZE, WITH ... SELECT and FROM-first queries are all SELECT here.
    if kind != "SELECT":
        # DuckDB files INSTALL under LOAD and CHECKPOINT under CALL: name what was written.
        words = sql.strip().split(None, 1)
        name = words[0].upper() if words else kind
        raise QueryError(f"the store is read-only: {name} statements are refused; use SELECT")
