"""Candidates: (image url, alt text) pairs from WARC, WAT and tabular lists.

Partitions are bounded: a WARC/WAT file is one, a big list is split (see plan_input). Each writes
`candidates/part-<key>.parquet` (uid, url, text, page_url, origin, attribute) and
`candidates/rejects/part-<key>.parquet` (origin, reason, detail): every image that was not kept and
every unreadable record, with why. Exact (url, text) duplicates across partitions are a shuffle: each
partition scatters (uid, partition, row) into buckets by uid (and by URL with `one_text_per_url`), and
one task per bucket writes the later copies to `candidates/duplicates/bNNNNN.parquet` and scatters
them back by partition (`candidates/duplicates/_by_part/<plan>/`), where the filter task of a
partition reads only the spans that hold its copies, and drops them with a reason.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pydantic import Field

from wit_builder import storage
from wit_builder.errors import WitError
from wit_builder.ids import fingerprint
from wit_builder.recipe import Section, input_path
from wit_builder.runner import (
    Manifest,
    combined_fingerprint,
    completed,
    partition_entry,
    step_info,
)
from wit_builder.shuffle import FORMAT as SHUFFLE_FORMAT
from wit_builder.shuffle import tracking_task
from wit_builder.stage import Stage, View
from wit_builder.workspace import Run, file_identity

from .collector import CANDIDATES_SCHEMA, REJECTS_SCHEMA, Collector
from .duplicates import find_duplicates, scatter_keys
from .lists import plan_input, read_table_part
from .warc import read_warc, read_wat

log = logging.getLogger("wit")
VERSION = 3
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
                  ".json": "jsonl"}


def input_kind(path: str) -> str:
    name = Path(path).name.lower()
    for suffix in (".gz", ".bz2", ".zst"):
        if name.endswith(suffix) and not name.endswith((".warc.gz", ".wat.gz")):
            name = name[: -len(suffix)]
    if name.endswith((".wat.gz", ".wat")):
        return "wat"
    if name.endswith((".warc.gz", ".warc")):
        return "warc"
    if name.endswith((".arc.gz", ".arc")):
        return "arc"
    kind = TABLE_SUFFIXES.get(Path(name).suffix)
    if kind is None:
        raise WitError("unknown input type: expected .warc[.gz], .wat.gz, .parquet, .csv, .tsv or "
                       ".jsonl", where=path)
    return kind


def extract(path: str, kind: str, url_col: str, caption_col: str, outputs: dict, start: int = 0,
            end: int | None = None) -> dict:
    """One partition of one input in; its candidates and rejects out."""
    collector = Collector()
    if kind == "warc":
        info = read_warc(path, collector)
    elif kind == "wat":
        info = read_wat(path, collector)
    elif kind == "arc":
        collector.reject(f"{Path(path).name}:0", "arc_format", "ARC files are not read; convert to WARC")
        info = {}
    else:
        info = read_table_part(path, kind, start, end, url_col, caption_col, collector)
    return {**info, **collector.write(outputs)}




def candidates_part(path: str, kind: str, start: int, end: int | None, url_col: str, caption_col: str,
                    part: int, one_text_per_url: bool, buckets: int, shuffle: str, outputs: dict) -> dict:
    """The task function: extract one partition, then scatter its duplicate keys into the buckets."""
    info = extract(path, kind, url_col, caption_col, outputs, start, end)
    scatter_keys(outputs["candidates"], part, one_text_per_url, buckets, shuffle)
    return info


def part_key(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", Path(path).name)


class CandidateSettings(Section):
    """Where the (image URL, text) pairs come from."""

    inputs: list[str] = input_path([])
    """WARC (.warc, .warc.gz), Common Crawl WAT (.wat.gz) and lists (.parquet, .csv, .tsv, .jsonl)."""
    url_col: str = "url"
    """The image URL column of tabular lists (img2dataset's name)."""
    caption_col: str = "caption"
    """The text column of tabular lists (img2dataset's name)."""
    one_text_per_url: bool = False
    """Keep only the first text seen for each image URL."""
    partition_rows: int = Field(default=1_000_000, ge=1)
    """Rows per partition: a big list is split by parquet row groups or, for CSV/TSV/JSONL, by byte ranges at
    line starts, so that `run.workers` parallelises one file. WARC/WAT: one file each."""
    buckets: int = Field(default=0, ge=0)
    """Buckets of the cross-partition duplicate shuffle; 0: one per GB of input."""


FUNNEL = """
SELECT 'candidates' AS step, NULL AS reason, count(*) AS rows FROM candidates
UNION ALL SELECT 'extraction rejected', reason, count(*) FROM candidate_rejects GROUP BY reason
"""


class CandidatesStage(Stage):
    name = "candidates"
    settings = CandidateSettings
    provides = {"candidates": CANDIDATES_SCHEMA, "rejects": REJECTS_SCHEMA}
    views = (View("candidates", "candidates/part-*.parquet"),
             View("candidate_rejects", "candidates/rejects/part-*.parquet"))
    main_view = "candidates"
    funnel = FUNNEL
    kept = ("candidates", "SELECT count(*) FROM candidates")

    def empty_hint(self, probe) -> str | None:
        return None if probe.count("candidates") else "no candidate pairs; check candidates.inputs"

    def expects_rows(self, recipe) -> bool:
        return bool(recipe.candidates.inputs)

    def plan(self, run: Run):
        c = run.recipe.candidates
        out = run.stage_dir(self.name)
        parts, total_bytes = [], 0
        for path in run.recipe.paths(c.inputs, "candidates.inputs"):
            if not storage.is_file(path):
                raise WitError("input file not found", where=path)
            kind = input_kind(path)
            ranges = plan_input(path, kind, c.partition_rows)
            size = storage.size(path)
            total_bytes += size
            for i, (start, end) in enumerate(ranges):
                key = part_key(path) if len(ranges) == 1 else f"{part_key(path)}-{i:05d}"
                weight = (end if end is not None else size) - start if kind not in ("parquet",) else size // len(ranges)
                parts.append((key, path, kind, start, end, file_identity(path), weight))
        keys = [p[0] for p in parts]
        if len(set(keys)) != len(keys):
            raise WitError("two inputs have the same file name; rename one", where="candidates.inputs")
        buckets = c.buckets or max(1, -(-total_bytes // (1 << 30)))
        settings = {"version": VERSION, "cols": [c.url_col, c.caption_col], "buckets": buckets,
                    "one_text_per_url": c.one_text_per_url, "partition_rows": c.partition_rows}
        namespace = fingerprint({**settings, "format": SHUFFLE_FORMAT,
                                 "parts": [(p[0], p[5], p[3], p[4]) for p in parts]})[:12]
        if (done := completed(run, self.name, namespace)) is not None:
            return done
        shuffle = str(out / "_shuffle" / namespace)
        tasks = []
        for index, (key, path, kind, start, end, identity, weight) in enumerate(parts):
            outputs = {"candidates": str(out / f"part-{key}.parquet"),
                       "rejects": str(out / "rejects" / f"part-{key}.parquet")}
            tasks.append(self.task(
                run, key, candidates_part,
                kwargs={"path": path, "kind": kind, "start": start, "end": end, "url_col": c.url_col,
                        "caption_col": c.caption_col, "part": index, "one_text_per_url": c.one_text_per_url,
                        "buckets": buckets, "shuffle": shuffle, "outputs": outputs},
                outputs=list(outputs.values()),
                inputs={**settings, "file": identity, "kind": kind, "range": [start, end], "part": index,
                        "shuffle": namespace},
                weight=max(weight, 1), receipt=str(Path(shuffle) / "_done" / key)))
        yield tasks
        maps = combined_fingerprint(tasks)
        yield [tracking_task(self, run, shuffle, maps, [("{:06d}", len(parts))])]
        back = out / "duplicates" / "_by_part" / namespace  # the later copies, by partition: kept for the filter
        reduces = []
        for b in range(buckets):
            output = str(out / "duplicates" / f"b{b:05d}.parquet")
            reduces.append(self.task(
                run, f"_bucket-{b:05d}", find_duplicates,
                kwargs={"shuffle": shuffle, "bucket": b, "output": output, "back": str(back), "partitions": len(parts)},
                outputs=[output, str(back / f"b{b:05d}.arrow"), str(back / f"b{b:05d}.index")],
                inputs={"version": VERSION, "maps": maps, "bucket": b}))
        yield reduces
        tracked = tracking_task(self, run, back, combined_fingerprint(reduces), [("b{:05d}", buckets)], "_by_part")
        yield [tracked]
        infos = step_info(tasks)
        return Manifest(self.name, [partition_entry(t, t.kwargs["outputs"], {"candidates": i.get("candidates", 0)})
                                    for t, i in zip(tasks, infos)],
                        {"duplicates": str(back), "duplicates_fingerprint": tracked.fingerprint},
                        fingerprint([maps, tracked.fingerprint]), plan=namespace,
                        scratch=[str(out / "_shuffle")])
