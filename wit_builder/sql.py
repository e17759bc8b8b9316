"""DuckDB over a run: one view per stage's parquet, read in place, never copied, and the `funnel`
view that every stage adds its rows to."""

from __future__ import annotations

from pathlib import Path

import duckdb

from . import workspace


def connect(run_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """DuckDB with the run's views; for a run in a store, read through the store's filesystem. A
    view exists once its stage has written a file, so a run still under way shows what has
    completed so far."""
    from .stage import all_views, funnel_sql

    run_dir = Path(run_dir)
    con = duckdb.connect()
    for view in all_views():
        folder, _, files = view.files.rpartition("/")
        if workspace.glob(run_dir / folder, files):
            path = workspace.duckdb_paths(con, [str(run_dir / view.files)])[0].replace("'", "''")
            con.execute(f"CREATE VIEW {view.name} AS SELECT * FROM read_parquet('{path}')")
    if funnel := funnel_sql(set(views(con))):
        con.execute(f"CREATE VIEW funnel AS {funnel}")
    return con


def views(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()]


class Probe:
    """Row counts over a run's views, for the stages' hints on a run that made nothing; a view
    that does not exist counts 0."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con
        self.existing = set(views(con))

    def count(self, view: str, where: str = "true") -> int:
        if view not in self.existing:
            return 0
        return self.con.sql(f"SELECT count(*) FROM {view} WHERE {where}").fetchall()[0][0]

    def top(self, view: str, where: str) -> str:
        """The three commonest reasons, as `reason (n), ...`."""
        if view not in self.existing:
            return ""
        rows = self.con.sql(f"SELECT reason, count(*) AS n FROM {view} WHERE {where} GROUP BY 1 "
                            "ORDER BY n DESC, reason LIMIT 3").fetchall()
        return ", ".join(f"{reason} ({n})" for reason, n in rows)
