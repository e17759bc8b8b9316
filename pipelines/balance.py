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
from pydantic import Field

from wit_builder.recipe import Section
from wit_builder.runner import Manifest, step_info
from wit_builder.shuffle import take_by_uid
from wit_builder.stage import Plot, Stage, View
from wit_builder.workspace import Run, read_table, write_parquet

from .sampling import keep_rows, read_counts

VERSION = 2
# The columns that later stages read (the file carries the shards' metadata too).
BALANCED_SCHEMA = pa.schema([("uid", pa.string()), ("query_ids", pa.list_(pa.int32())), ("keep", pa.bool_())])


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


class BalanceSettings(Section):
    """MetaCLIP's balancing: the head queries capped, the tail kept whole."""

    t: int = Field(default=20_000, ge=1)
    """At most about t pairs per query (MetaCLIP: 20,000 for 400M pairs)."""
    oversample: float = Field(default=2.5, ge=0)
    """Before download, keep each query to about t * oversample candidates at the text level, so a web-scale
    run does not fetch images it will throw away. 0 turns the cap off. The default allows for the ~50% of
    candidates that fail to download or are duplicates (bench/README.md)."""


# The reason of a dropped row: its queries were all over the threshold t, and the draw left it out.
FUNNEL = """
SELECT 'balance ' || CASE WHEN keep THEN 'kept' ELSE 'dropped' END AS step,
       CASE WHEN keep THEN NULL ELSE 'over_threshold' END AS reason, count(*) AS rows
FROM balanced GROUP BY keep
"""


def _per_query_plot(con):
    import matplotlib.pyplot as plt

    before = [r[0] for r in con.execute("SELECT count(*) c FROM (SELECT unnest(query_ids) q FROM matched) "
                                        "GROUP BY q ORDER BY c DESC").fetchall()]
    after = [r[0] for r in con.execute("SELECT count(*) c FROM (SELECT unnest(query_ids) q FROM balanced "
                                       "WHERE keep) GROUP BY q ORDER BY c DESC").fetchall()]
    fig, ax = plt.subplots(figsize=(7, 4))
    if before:
        ax.loglog(range(1, len(before) + 1), before, label="matched (before balancing)")
    if after:
        ax.loglog(range(1, len(after) + 1), after, label="kept (after balancing)")
    ax.set_xlabel("query rank")
    ax.set_ylabel("pairs per query")
    ax.set_title("Pairs per query: the head is capped, the tail kept")
    ax.legend()
    return fig


class BalanceStage(Stage):
    name = "balance"
    needs = ("dedup",)
    settings = BalanceSettings
    provides = {"balanced": BALANCED_SCHEMA}
    views = (View("balanced", "balanced/part-*.parquet"),)
    main_view = "balanced"
    funnel = FUNNEL
    kept = ("after balancing", "SELECT count(*) FROM balanced WHERE keep")
    plots = (Plot("Pairs per query, before and after balancing (log-log)", "per_query", _per_query_plot,
                  ("matched", "balanced")),)

    def empty_hint(self, probe) -> str | None:
        return None if probe.count("balanced", "keep") else "balancing kept nothing; see balance.t"

    def plan(self, run: Run):
        up = self.needed(run, "dedup")
        b = run.recipe.balance
        seed = run.recipe.run.seed
        out = run.stage_dir("balanced")
        tasks = []
        for part in up.parts():
            output = str(out / f"part-{part.key}.parquet")
            tasks.append(self.task(
                run, part.key, balance_part,
                kwargs={"dedup": part.file("dedup"), "counts": up.output("counts"), "matched": part.file("matched"),
                        "candidates": part.file("candidates"), "status": part.file("status"), "t": b.t,
                        "seed": seed, "output": output},
                outputs=[output],
                inputs={"version": VERSION, "upstream": part.fingerprint, "counts": up.fingerprint,
                        "t": b.t, "seed": seed},
                weight=part.info.get("kept", 1) or 1))
        yield tasks
        infos = step_info(tasks)
        return Manifest(self.name, [p.entry(t, {"balanced": t.outputs[0]}, {k: i.get(k, 0) for k in ("kept", "kept_bytes")})
                                    for t, p, i in zip(tasks, up.parts(), infos)])
