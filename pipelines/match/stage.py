"""Match: keep the filtered pairs whose text contains at least one query.

Per partition: `matched/part-<key>.parquet` (uid, url, text, page_url, query_ids list<int32>) for the
pairs that match, and `matched/counts/part-<key>.parquet` (query_id, count), which balancing reduces.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from wit_builder.errors import WitError
from wit_builder.recipe import Section
from wit_builder.runner import Manifest, step_info
from wit_builder.stage import Stage, View
from wit_builder.workspace import Run, read_table, write_parquet

from ..sampling import query_counts, sum_counts_steps, sums_folder
from .matcher import QueryMatcher

VERSION = 1
COUNTS_SCHEMA = pa.schema([("query_id", pa.int32()), ("count", pa.int64())])
MATCHED_SCHEMA = pa.schema([("uid", pa.string()), ("url", pa.string()), ("text", pa.string()),
                            ("page_url", pa.string()), ("query_ids", pa.list_(pa.int32()))])


@lru_cache(maxsize=2)
def matcher_for(queries_path: str, mode: str, stamp: str) -> QueryMatcher:
    """One automaton per worker process, rebuilt only when the query list changes (`stamp`)."""
    table = read_table(queries_path, columns=["query_id", "query", "count"])
    if table.column("query_id").to_pylist() != list(range(table.num_rows)):
        raise WitError("query_id must be 0..n-1 in order", where=queries_path)
    return QueryMatcher(table.column("query").to_pylist(), mode, table.column("count").to_pylist())


def match_part(candidates: str, filtered: str, queries: str, stamp: str, mode: str, batch_size: int,
               outputs: dict) -> dict:
    matcher = matcher_for(queries, mode, stamp)
    cand = read_table(candidates, columns=["uid", "url", "page_url"])
    filt = read_table(filtered, columns=["ok", "text"])
    keep = filt.column("ok")
    rows = pa.table({"uid": cand.column("uid"), "url": cand.column("url"),
                     "text": filt.column("text"), "page_url": cand.column("page_url")}).filter(keep)
    batches = [matcher.match(rows.column("text").slice(i, batch_size))
               for i in range(0, rows.num_rows, batch_size)]
    ids = pa.concat_arrays(batches) if batches else pa.array([], pa.list_(pa.int32()))
    matched = rows.append_column("query_ids", ids).filter(pc.greater(pc.list_value_length(ids), 0))
    write_parquet(matched, outputs["matched"])
    write_parquet(query_counts(matched.column("query_ids")).cast(COUNTS_SCHEMA), outputs["counts"])
    return {"filtered_ok": rows.num_rows, "matched": matched.num_rows,
            "automaton_build_s": round(matcher.build_seconds, 2)}


class MatchSettings(Section):
    """Which pairs a query claims."""

    mode: Literal["words", "metaclip"] = "words"
    """`words`: a query matches whole words of the caption (case-insensitive); `metaclip`: a substring
    match, as MetaCLIP does."""
    batch_size: int = Field(default=200_000, ge=1)
    """Captions per call of the matcher."""


FUNNEL = "SELECT 'matched' AS step, NULL AS reason, count(*) AS rows FROM matched"


class MatchStage(Stage):
    name = "match"
    needs = ("queries", "filter")
    settings = MatchSettings
    provides = {"matched": MATCHED_SCHEMA, "counts": COUNTS_SCHEMA}
    views = (View("matched", "matched/part-*.parquet"), View("match_counts", "matched/counts/part-*.parquet"))
    main_view = "matched"
    funnel = FUNNEL
    kept = ("matched", "SELECT count(*) FROM matched")

    def empty_hint(self, probe) -> str | None:
        if probe.count("matched"):
            return None
        return f"no caption of the {probe.count('filtered', 'ok')} kept contains a query; see [match] and the query list"

    def plan(self, run: Run):
        up = self.needed(run, "filter")
        queries = self.needed(run, "queries")
        m = run.recipe.match
        out = run.stage_dir("matched")
        tasks = []
        for part in up.parts():
            outputs = {"matched": str(out / f"part-{part.key}.parquet"),
                       "counts": str(out / "counts" / f"part-{part.key}.parquet")}
            tasks.append(self.task(
                run, part.key, match_part,
                kwargs={"candidates": part.file("candidates"), "filtered": part.file("filtered"),
                        "queries": queries.output("queries"), "stamp": queries.fingerprint, "mode": m.mode,
                        "batch_size": m.batch_size, "outputs": outputs},
                outputs=list(outputs.values()),
                inputs={"version": VERSION, "upstream": part.fingerprint, "mode": m.mode, "queries": queries.fingerprint},
                weight=part.info.get("candidates", 1) or 1))
        yield tasks
        total = str(out / "query_counts.parquet")
        yield from sum_counts_steps(self, run, tasks, total)
        infos = step_info(tasks)
        return Manifest(self.name, [p.entry(t, t.kwargs["outputs"], {"matched": i.get("matched", 0)})
                                    for t, p, i in zip(tasks, up.parts(), infos)], {"counts": total},
                        scratch=[str(sums_folder(total))])
