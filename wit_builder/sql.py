"""DuckDB over a run: one view per stage's parquet, read in place, never copied."""

from __future__ import annotations

from pathlib import Path

import duckdb

from . import workspace

# view name -> glob under the run folder. A view exists once its stage has written a file, so the
# views of a run still under way show what has completed so far.
VIEWS = {
    "queries": "queries/queries.parquet",
    "dump_errors": "queries/counts/*.errors.parquet",
    "candidates": "candidates/part-*.parquet",
    "candidate_rejects": "candidates/rejects/part-*.parquet",
    "filtered": "filtered/part-*.parquet",
    "matched": "matched/part-*.parquet",
    "match_counts": "matched/counts/part-*.parquet",
    "downloads": "download/part-*.parquet",
    "images": "download/images/part-*.parquet",
    "dedup": "dedup/part-*.parquet",
    "balanced": "balanced/part-*.parquet",
    "shards": "shards/shards.parquet",
}


# The view that holds each stage's main output, for `wit status`.
STAGE_VIEWS = {"queries": "queries", "candidates": "candidates", "filter": "filtered", "match": "matched",
               "download": "downloads", "dedup": "dedup", "balance": "balanced", "shards": "shards"}


def connect(run_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """DuckDB with the run's views; for a run in a store, read through the store's filesystem."""
    run_dir = Path(run_dir)
    con = duckdb.connect()
    for name, pattern in VIEWS.items():
        folder, _, files = pattern.rpartition("/")
        if workspace.glob(run_dir / folder, files):
            path = workspace.duckdb_paths(con, [str(run_dir / pattern)])[0].replace("'", "''")
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{path}')")
    return con


def views(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()]
