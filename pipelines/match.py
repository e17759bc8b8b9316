"""Match: keep the filtered pairs whose text contains at least one query.

Per partition: `matched/part-<key>.parquet` (uid, url, text, page_url, query_ids list<int32>) for the
pairs that match, and `matched/counts/part-<key>.parquet` (query_id, count), which balancing reduces.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wit_builder.errors import WitError
from wit_builder.runner import Stage, Task
from wit_builder.workspace import Run, write_parquet

from .filter import FilterStage
from .matcher import QueryMatcher

VERSION = 1
COUNTS_SCHEMA = pa.schema([("query_id", pa.int32()), ("count", pa.int64())])


@lru_cache(maxsize=2)
def matcher_for(queries_path: str, mode: str, stamp: int) -> QueryMatcher:
    """One automaton per worker process, rebuilt only when the query list changes (`stamp`)."""
    table = pq.read_table(queries_path, columns=["query_id", "query", "count"])
    if table.column("query_id").to_pylist() != list(range(table.num_rows)):
        raise WitError("query_id must be 0..n-1 in order", where=queries_path)
    return QueryMatcher(table.column("query").to_pylist(), mode, table.column("count").to_pylist())


def match_part(candidates: str, filtered: str, queries: str, stamp: int, mode: str, batch_size: int,
               outputs: dict) -> dict:
    matcher = matcher_for(queries, mode, stamp)
    cand = pq.read_table(candidates, columns=["uid", "url", "page_url"])
    filt = pq.read_table(filtered, columns=["ok", "text"])
    keep = filt.column("ok")
    rows = pa.table({"uid": cand.column("uid"), "url": cand.column("url"),
                     "text": filt.column("text"), "page_url": cand.column("page_url")}).filter(keep)
    batches = [matcher.match(rows.column("text").slice(i, batch_size))
               for i in range(0, rows.num_rows, batch_size)]
    ids = pa.concat_arrays(batches) if batches else pa.array([], pa.list_(pa.int32()))
    matched = rows.append_column("query_ids", ids).filter(pc.greater(pc.list_value_length(ids), 0))
    write_parquet(matched, outputs["matched"])
    flat = pc.list_flatten(matched.column("query_ids")).to_numpy(zero_copy_only=False)
    counts = np.bincount(flat, minlength=0) if len(flat) else np.zeros(0, np.int64)
    nz = np.flatnonzero(counts)
    write_parquet(pa.table({"query_id": pa.array(nz, pa.int32()), "count": pa.array(counts[nz], pa.int64())},
                           schema=COUNTS_SCHEMA), outputs["counts"])
    return {"filtered_ok": rows.num_rows, "matched": matched.num_rows,
            "automaton_build_s": round(matcher.build_seconds, 2)}


class MatchStage(Stage):
    name = "match"

    def tasks(self, run: Run) -> list[Task]:
        upstream = FilterStage().tasks(run)
        queries = run.stage_dir("queries") / "queries.parquet"
        if upstream and not queries.exists():
            raise WitError("no query list yet: run the queries stage first", where=str(queries))
        qmarker = run.read_marker("queries", "_reduce") or {}
        stamp = queries.stat().st_mtime_ns if queries.exists() else 0
        m = run.recipe.match
        out = run.stage_dir("matched")
        tasks = []
        for t in upstream:
            outputs = {"matched": str(out / f"part-{t.key}.parquet"),
                       "counts": str(out / "counts" / f"part-{t.key}.parquet")}
            tasks.append(Task(
                stage=self.name, key=t.key, func=match_part,
                kwargs={"candidates": t.kwargs["candidates"], "filtered": t.outputs[0],
                        "queries": str(queries), "stamp": stamp, "mode": m.mode,
                        "batch_size": m.batch_size, "outputs": outputs},
                outputs=list(outputs.values()), marker=str(run.marker_path(self.name, t.key)),
                inputs={"version": VERSION, "upstream": t.fingerprint, "mode": m.mode,
                        "queries": qmarker.get("fingerprint", stamp)},
                weight=t.weight,
            ))
        return tasks

    def reduce_task(self, run: Run, tasks: list[Task]) -> Task | None:
        if not tasks:
            return None
        out = run.stage_dir("matched") / "query_counts.parquet"
        return Task(stage=self.name, key="_reduce", func=sum_counts,
                    kwargs={"parts": [t.kwargs["outputs"]["counts"] for t in tasks], "output": str(out)},
                    outputs=[str(out)], marker=str(run.marker_path(self.name, "_reduce")),
                    inputs={"version": VERSION, "parts": [t.fingerprint for t in tasks]})


def sum_counts(parts: list[str], output: str) -> dict:
    """Pairs per query over all partitions: what the pre-download cap needs."""
    import duckdb

    con = duckdb.connect()
    con.execute("CREATE TABLE c AS SELECT query_id, sum(count)::BIGINT AS count FROM read_parquet($p) "
                "GROUP BY 1 ORDER BY 1", {"p": parts})
    table = con.sql("SELECT * FROM c ORDER BY query_id").to_arrow_table()
    write_parquet(table.cast(COUNTS_SCHEMA), output)
    return {"queries": table.num_rows}
