"""MetaCLIP's balancing rule, shared by the pre-download cap and the balance stage.

Each entry e gets p(e) = t / max(count(e), t). A pair is kept when any of its entries keeps it, each
entry drawing u(uid, e, seed) < p(e): so a pair is kept with probability 1 - prod(1 - p(e)). Every
draw is a hash of (uid, query_id, seed), so the selection is the same on any partitioning or executor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wit_builder.shuffle import splitmix64, uid_to_u64
from wit_builder.workspace import read_table


def draws(uid64: np.ndarray, qids: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) numbers, one per (uid, query id), from their hash with the seed."""
    with np.errstate(over="ignore"):
        salt = splitmix64(qids.astype(np.uint64) * np.uint64(1 << 32) + np.uint64(seed & 0xFFFFFFFF))
        h = splitmix64(uid64 ^ salt)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def keep_mask(uid64: np.ndarray, offsets: np.ndarray, qids: np.ndarray, counts: np.ndarray, t: float,
              seed: int) -> np.ndarray:
    """Balance decisions for rows whose query ids are qids[offsets[i]:offsets[i+1]]; counts is indexed
    by query id."""
    p = t / np.maximum(counts[qids], t)
    row = np.repeat(np.arange(len(uid64)), np.diff(offsets))
    hit = draws(uid64[row], qids, seed) < p
    keep = np.zeros(len(uid64), bool)
    np.logical_or.at(keep, row[hit], True)
    return keep


def read_counts(path: str) -> np.ndarray:
    """A (query_id, count) table as an array indexed by query id."""
    table = read_table(path)
    size = int(pc.max(table.column("query_id")).as_py() or 0) + 1 if table.num_rows else 1
    counts = np.zeros(size, np.int64)
    counts[table.column("query_id").to_numpy()] = table.column("count").to_numpy()
    return counts


def keep_rows(uids: pa.ChunkedArray | pa.Array, query_ids: pa.ChunkedArray | pa.Array, counts: np.ndarray,
              t: float, seed: int) -> np.ndarray:
    """keep_mask over a table's uid and query_ids columns."""
    lists = query_ids.combine_chunks() if isinstance(query_ids, pa.ChunkedArray) else query_ids
    if len(lists) == 0:
        return np.zeros(0, bool)
    qids = lists.flatten().to_numpy().astype(np.int64)
    offsets = lists.offsets.to_numpy()
    offsets = offsets - offsets[0]
    if len(qids) and qids.max() >= len(counts):  # a query with no count: count it as 0 (kept)
        counts = np.r_[counts, np.zeros(qids.max() + 1 - len(counts), np.int64)]
    return keep_mask(uid_to_u64(uids), offsets, qids, counts, t, seed)


def query_counts(query_ids: pa.ChunkedArray | pa.Array) -> pa.Table:
    """(query_id, count) of a list<int> column: the partial counts that a reduce sums."""
    flat = pc.list_flatten(query_ids).to_numpy(zero_copy_only=False) if len(query_ids) else []
    counts = np.bincount(np.asarray(flat, np.int64)) if len(flat) else np.zeros(0, np.int64)
    nz = np.flatnonzero(counts)
    return pa.table({"query_id": pa.array(nz, pa.int32()), "count": pa.array(counts[nz], pa.int64())})


COUNTS_FAN_IN = 256  # count files summed by one task


def sum_counts_steps(stage, run, tasks: list, output: str, fan_in: int = COUNTS_FAN_IN):
    """The steps that sum the per-partition counts (each task's outputs["counts"]) into `output`: a
    tree of sums over at most `fan_in` files each (partial sums in `sums_folder(output)`), so no task
    reads, or lists in its arguments, one file per partition. Yields each level's tasks; returns the
    last one (`_reduce`)."""
    from wit_builder.ids import fingerprint

    files, prints, level = [t.kwargs["outputs"]["counts"] for t in tasks], [t.fingerprint for t in tasks], 0
    while True:
        last = len(files) <= fan_in
        level_tasks = []
        for g, start in enumerate(range(0, max(len(files), 1), fan_in)):
            out = output if last else str(sums_folder(output) / f"{level}-{g:05d}.parquet")
            level_tasks.append(stage.task(run, "_reduce" if last else f"_sum-{level}-{g:05d}", sum_counts,
                                          kwargs={"parts": files[start: start + fan_in], "output": out}, outputs=[out],
                                          inputs={"version": 1, "parts": fingerprint(prints[start: start + fan_in])}))
        yield level_tasks
        if last:
            return level_tasks[0]
        files, prints, level = [t.outputs[0] for t in level_tasks], [t.fingerprint for t in level_tasks], level + 1


def sums_folder(output: str) -> Path:
    """Where the partial sums of `output` go (scratch: deleted with the stage's shuffles)."""
    return Path(output).parent / "_sums"


def sum_counts(parts: list[str], output: str) -> dict:
    """Pairs per query over all partitions: partial counts summed (500k queries at most: tiny)."""
    import duckdb

    from wit_builder.workspace import duckdb_paths, write_parquet

    con = duckdb.connect()
    if parts:
        con.execute("CREATE TABLE c AS SELECT query_id, sum(count)::BIGINT AS count FROM read_parquet($p) "
                    "GROUP BY 1", {"p": duckdb_paths(con, parts)})
        table = con.sql("SELECT * FROM c ORDER BY query_id").to_arrow_table()
    else:
        table = query_counts(pa.array([], pa.list_(pa.int32())))
    schema = pa.schema([("query_id", pa.int32()), ("count", pa.int64())])
    write_parquet(table.cast(schema), output)
    return {"queries": table.num_rows}
