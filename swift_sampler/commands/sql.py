"""``swift-sampler sql STORE "SELECT ..."``: query the store's DuckDB views."""

from __future__ import annotations

import json

from swift_sampler.storage import available_views, query
from swift_sampler.storage.catalog import VIEWS

from ..cli import add_store_option, emit


def register(sub, groups) -> None:
    p = sub.add_parser(
        "sql",
        help="run a read-only SQL query over the store's views",
        description="Run one read-only SQL query over the store. Views: "
        f"{', '.join(VIEWS)} (each once the stage that writes it has run).",
    )
    add_store_option(p, positional=True)
    p.add_argument("query", help='SQL, e.g. "SELECT split, count(*) FROM samples GROUP BY split"')
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines, then the summary")
    p.add_argument("--limit", type=int, default=50, help="rows to print as a table (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    table = query(args.store, args.query)
    rows = table.to_pylist()
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str))
    else:
        print(format_table(table.column_names, rows[: args.limit]))
        if len(rows) > args.limit:
            print(f"... {len(rows) - args.limit} more rows (use --limit or --json)")
    emit({"command": "sql", "rows": len(rows), "columns": table.column_names,
          "views": available_views(args.store)})
    return 0


def format_table(columns: list[str], rows: list[dict]) -> str:
    cells = [[_fmt(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "NULL" if v is None else str(v)
