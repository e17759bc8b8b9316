"""Balance: MetaCLIP's rule, at most about t pairs per query.

Each entry e gets p(e) = t / max(count(e), t), with count(e) over the dedup survivors. A pair is kept
when any of its entries keeps it, each entry drawing u(uid, e, seed) < p(e): so a pair is kept with
probability 1 - prod(1 - p(e)). Tail entries (count <= t) keep everything; head entries are sampled
down to about t. Every draw is a hash of (uid, query_id, seed), so the selection is the same on any
partitioning or executor, and t can be re-tuned without re-matching.

Per partition: `balanced/part-<key>.parquet` with every dedup survivor (uid, query_ids, keep) and the
metadata the shards carry (url, page_url, text, width, height, sha256, phash, origin, bytes).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wit_builder.runner import Stage, Task
from wit_builder.workspace import Run, write_parquet

from .dedup import DedupStage

VERSION = 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing function (wrapping arithmetic on purpose)."""
    with np.errstate(over="ignore"):
        x = (x + _GOLDEN).astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uid_to_u64(uids) -> np.ndarray:
    """The 16-hex-digit uids as the 64-bit numbers they spell."""
    return np.array([int(u, 16) for u in uids], np.uint64)


def draws(uid64: np.ndarray, qids: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) numbers, one per (uid, query id), from their hash with the seed."""
    with np.errstate(over="ignore"):
        salt = splitmix64(qids.astype(np.uint64) * np.uint64(1 << 32) + np.uint64(seed & 0xFFFFFFFF))
        h = splitmix64(uid64 ^ salt)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def keep_mask(uid64: np.ndarray, offsets: np.ndarray, qids: np.ndarray, counts: np.ndarray, t: int,
              seed: int) -> np.ndarray:
    """Balance decisions for rows whose query ids are qids[offsets[i]:offsets[i+1]]; counts is indexed
    by query id."""
    p = t / np.maximum(counts[qids], t)
    row = np.repeat(np.arange(len(uid64)), np.diff(offsets))
    hit = draws(uid64[row], qids, seed) < p
    keep = np.zeros(len(uid64), bool)
    np.logical_or.at(keep, row[hit], True)
    return keep


def balance_part(hashes: str, dedup: str, counts: str, matched: str, candidates: str, status: str,
                 t: int, seed: int, output: str) -> dict:
    rows = pq.read_table(hashes)
    decisions = pq.read_table(dedup, columns=["uid", "keep"], filters=[("keep", "=", True)])
    rows = rows.filter(pc.is_in(rows.column("uid"), value_set=decisions.column("uid")))
    uid = rows.column("uid")

    def aligned(path, columns):
        table = pq.read_table(path, columns=["uid", *columns])
        return table.take(pc.index_in(uid, value_set=table.column("uid")))

    m = aligned(matched, ["text", "page_url"])
    c = aligned(candidates, ["origin"])
    s = aligned(status, ["bytes"])
    count_table = pq.read_table(counts)
    size = max(int(pc.max(count_table.column("query_id")).as_py() or 0) + 1, 1) if count_table.num_rows else 1
    by_query = np.zeros(size, np.int64)
    by_query[count_table.column("query_id").to_numpy()] = count_table.column("count").to_numpy()
    qlists = rows.column("query_ids").combine_chunks()
    keep = keep_mask(uid_to_u64(uid.to_pylist()), qlists.offsets.to_numpy(), qlists.flatten().to_numpy(),
                     by_query, t, seed)
    out = pa.table({
        "uid": uid, "query_ids": rows.column("query_ids"), "keep": pa.array(keep),
        "url": rows.column("url"), "page_url": m.column("page_url"), "text": m.column("text"),
        "width": rows.column("width"), "height": rows.column("height"), "sha256": rows.column("sha256"),
        "phash": rows.column("phash"), "origin": c.column("origin"), "bytes": s.column("bytes"),
    })
    write_parquet(out, output)
    return {"survivors": out.num_rows, "kept": int(keep.sum())}


class BalanceStage(Stage):
    name = "balance"

    def tasks(self, run: Run) -> list[Task]:
        upstream = DedupStage()
        parts = upstream.tasks(run)
        reduce = upstream.reduce_task(run, parts)
        if reduce is None:
            return []
        b = run.recipe.balance
        out = run.stage_dir("balanced")
        tasks = []
        for t in parts:
            download = t.kwargs
            output = str(out / f"part-{t.key}.parquet")
            tasks.append(Task(
                stage=self.name, key=t.key, func=balance_part,
                kwargs={"hashes": t.outputs[0], "dedup": reduce.outputs[0], "counts": reduce.outputs[1],
                        "matched": download["matched"],
                        "candidates": str(run.stage_dir("candidates") / f"part-{t.key}.parquet"),
                        "status": download["status"], "t": b.t, "seed": run.recipe.run.seed,
                        "output": output},
                outputs=[output], marker=str(run.marker_path(self.name, t.key)),
                inputs={"version": VERSION, "upstream": t.fingerprint, "dedup": reduce.fingerprint,
                        "t": b.t, "seed": run.recipe.run.seed},
                weight=t.weight))
        return tasks
