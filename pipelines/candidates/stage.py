"""Candidates: (image url, alt text) pairs from WARC, WAT and tabular lists.

Partitions are bounded: a WARC/WAT file is one, a big list is split (see plan_input). Each writes
`candidates/part-<key>.parquet` (uid, url, text, page_url, origin, attribute) and
`candidates/rejects/part-<key>.parquet` (origin, reason, detail): every image that was not kept and
every unreadable record, with why. Exact (url, text) duplicates across partitions are a shuffle: each
partition scatters (uid, partition, row) into buckets by uid (and by URL with `one_text_per_url`), and
one task per bucket writes the later copies to `candidates/duplicates/bNNNNN.parquet`, sorted by
partition, which the filter stage reads its own slice of and drops with a reason.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from wit_builder import storage
from wit_builder.errors import WitError
from wit_builder.ids import fingerprint
from wit_builder.runner import (
    Manifest,
    Stage,
    Task,
    combined_fingerprint,
    completed,
    partition_entry,
    step_info,
)
from wit_builder.shuffle import FORMAT as SHUFFLE_FORMAT
from wit_builder.workspace import Run, file_identity

from .collector import Collector
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


class CandidatesStage(Stage):
    name = "candidates"

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
            tasks.append(Task(
                stage=self.name, key=key, func=candidates_part,
                kwargs={"path": path, "kind": kind, "start": start, "end": end, "url_col": c.url_col,
                        "caption_col": c.caption_col, "part": index, "one_text_per_url": c.one_text_per_url,
                        "buckets": buckets, "shuffle": shuffle, "outputs": outputs},
                outputs=list(outputs.values()), marker=str(run.marker_path(self.name, key)),
                inputs={**settings, "file": identity, "kind": kind, "range": [start, end], "part": index,
                        "shuffle": namespace},
                weight=max(weight, 1), receipt=str(Path(shuffle) / "_done" / key)))
        yield tasks
        maps = combined_fingerprint(tasks)
        reduces = [Task(stage=self.name, key=f"_bucket-{b:05d}", func=find_duplicates,
                        kwargs={"shuffle": shuffle, "bucket": b, "output": str(out / "duplicates" / f"b{b:05d}.parquet")},
                        outputs=[str(out / "duplicates" / f"b{b:05d}.parquet")],
                        marker=str(run.marker_path(self.name, f"_bucket-{b:05d}")),
                        inputs={"version": VERSION, "maps": maps, "bucket": b})
                   for b in range(buckets)]
        yield reduces
        infos = step_info(tasks)
        return Manifest(self.name, [partition_entry(t, t.kwargs["outputs"], {"candidates": i.get("candidates", 0)})
                                    for t, i in zip(tasks, infos)],
                        {"duplicates": [r.outputs[0] for r in reduces]},
                        fingerprint([maps, combined_fingerprint(reduces)]), plan=namespace,
                        scratch=[str(out / "_shuffle")])
