"""Balance: MetaCLIP's rule (pipelines/sampling.py), at most about t pairs per query.

count(e) is over the dedup survivors of every partition, summed by dedup. Every draw is a hash of
(uid, query_id, seed), so the selection is the same on any partitioning or executor, and t can be
re-tuned without re-matching. Each partition reads its own rows, its own decisions and the counts only.

Per partition: `balanced/part-<key>.parquet` with every dedup survivor (uid, query_ids, keep) and the
metadata the shards carry (url, page_url, text, width, height, sha256, phash, origin, bytes).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from wit_builder.runner import Manifest, Stage, Task, partition_entry, step_info
from wit_builder.shuffle import take_by_uid
from wit_builder.workspace import Run, read_table, write_parquet

from .sampling import keep_rows, read_counts

VERSION = 2


def balance_part(dedup: str, counts: str, matched: str, candidates: str, status: str, t: int, seed: int,
                 output: str) -> dict:
    rows = read_table(dedup, columns=["uid", "url", "sha256", "phash", "width", "height", "query_ids"],
                      filters=[("keep", "=", True)])
    uid = rows.column("uid")
    m = take_by_uid(read_table(matched, columns=["uid", "text", "page_url"]), uid)
    c = take_by_uid(read_table(candidates, columns=["uid", "origin"]), uid)
    s = take_by_uid(read_table(status, columns=["uid", "bytes"]), uid)
    keep = keep_rows(uid, rows.column("query_ids"), read_counts(counts), t, seed)
    out = pa.table({
        "uid": uid, "query_ids": rows.column("query_ids"), "keep": pa.array(keep, pa.bool_()),
        "url": rows.column("url"), "page_url": m.column("page_url"), "text": m.column("text"),
        "width": rows.column("width"), "height": rows.column("height"), "sha256": rows.column("sha256"),
        "phash": rows.column("phash"), "origin": c.column("origin"), "bytes": s.column("bytes"),
    })
    write_parquet(out, output)
    kept_bytes = pc.sum(s.column("bytes").filter(pa.array(keep, pa.bool_()))).as_py() if out.num_rows else 0
    return {"survivors": out.num_rows, "kept": int(keep.sum()), "kept_bytes": int(kept_bytes or 0)}


class BalanceStage(Stage):
    name = "balance"
    upstream = "dedup"

    def plan(self, run: Run):
        up = self.upstream_manifest(run)
        b = run.recipe.balance
        seed = run.recipe.run.seed
        out = run.stage_dir("balanced")
        tasks = []
        for part in up.partitions:
            files, output = part["files"], str(out / f"part-{part['key']}.parquet")
            tasks.append(Task(
                stage=self.name, key=part["key"], func=balance_part,
                kwargs={"dedup": files["dedup"], "counts": up.outputs["counts"], "matched": files["matched"],
                        "candidates": files["candidates"], "status": files["status"], "t": b.t, "seed": seed,
                        "output": output},
                outputs=[output], marker=str(run.marker_path(self.name, part["key"])),
                inputs={"version": VERSION, "upstream": part["fingerprint"], "counts": up.fingerprint,
                        "t": b.t, "seed": seed},
                weight=part["info"].get("kept", 1) or 1))
        yield tasks
        infos = step_info(tasks)
        return Manifest(self.name, [partition_entry(t, {**p["files"], "balanced": t.outputs[0]},
                                                    {k: i.get(k, 0) for k in ("kept", "kept_bytes")})
                                    for t, p, i in zip(tasks, up.partitions, infos)],
                        {"queries": up.outputs["queries"], "queries_fingerprint": up.outputs["queries_fingerprint"]})
