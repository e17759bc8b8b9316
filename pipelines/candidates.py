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

import io
import json
import logging
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from wit_builder.errors import WitError
from wit_builder.ids import fingerprint, uid
from wit_builder.runner import (Manifest, Stage, Task, combined_fingerprint, completed, partition_entry,
                                step_info)
from wit_builder.shuffle import (SLICE_ROW_GROUP, bucket_of, read_bucket, scatter,
                                 splitmix64, string_hash64, uid_to_u64)
from wit_builder.workspace import Run, file_identity, read_table, write_parquet

from .urls import normalise_url

log = logging.getLogger("wit")
VERSION = 1

CANDIDATES_SCHEMA = pa.schema([
    ("uid", pa.string()), ("url", pa.string()), ("text", pa.string()), ("page_url", pa.string()),
    ("origin", pa.string()), ("attribute", pa.string()),
])
REJECTS_SCHEMA = pa.schema([("origin", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
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


class Collector:
    """Rows and rejects of one partition; exact (url, text) duplicates inside it are rejected."""

    def __init__(self):
        self.rows: dict[str, tuple] = {}
        self.rejects: list[tuple[str, str, str]] = []

    def add(self, url: str, text: str, base: str, page_url: str, origin: str, attribute: str) -> None:
        text = " ".join(text.split())
        norm, reason = normalise_url(url, base)
        if norm is None:
            self.rejects.append((origin, reason, url[:200]))
            return
        key = uid(norm, text)
        if key in self.rows:
            self.rejects.append((origin, "duplicate", key))
            return
        self.rows[key] = (key, norm, text, page_url, origin, attribute)

    def reject(self, origin: str, reason: str, detail: str = "") -> None:
        self.rejects.append((origin, reason, detail[:500]))

    def write(self, outputs: dict[str, str]) -> dict:
        rows = list(self.rows.values())
        cols = list(zip(*rows)) if rows else [[]] * len(CANDIDATES_SCHEMA)
        write_parquet(pa.table(dict(zip(CANDIDATES_SCHEMA.names, cols)), schema=CANDIDATES_SCHEMA),
                      outputs["candidates"])
        rcols = list(zip(*self.rejects)) if self.rejects else [[]] * 3
        write_parquet(pa.table(dict(zip(REJECTS_SCHEMA.names, rcols)), schema=REJECTS_SCHEMA),
                      outputs["rejects"])
        return {"candidates": len(rows), "rejects": len(self.rejects)}


# --- HTML ----------------------------------------------------------------------------------------

_SRCSET_ITEM = re.compile(r"\s*(\S+?)(?:\s+([\d.]+)([wx]))?\s*(?:,|$)")


def largest_srcset(srcset: str) -> str:
    """The srcset candidate with the largest width or density descriptor."""
    best, best_size = "", -1.0
    for m in _SRCSET_ITEM.finditer(srcset):
        if not m.group(1):
            continue
        size = float(m.group(2)) if m.group(2) else 1.0
        if size > best_size:
            best, best_size = m.group(1), size
    return best


def html_images(collector: Collector, body: bytes, page_url: str, origin: str) -> int:
    """Every <img> with a text (alt, else title) and a usable URL (src, else data-src, else the
    largest srcset entry), resolved against <base href> or the page URL."""
    from resiliparse.parse.encoding import detect_encoding
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse_from_bytes(body, detect_encoding(body))
    base = page_url
    base_el = tree.document.query_selector("base[href]")
    if base_el is not None:
        base = normalise_url(base_el.getattr("href") or "", page_url)[0] or page_url
    images = 0
    for img in tree.document.query_selector_all("img"):
        images += 1
        alt, title = img.getattr("alt") or "", img.getattr("title") or ""
        text, text_attr = (alt, "alt") if alt.strip() else (title, "title")
        if not text.strip():
            collector.reject(origin, "no_text", img.getattr("src") or "")
            continue
        src = (img.getattr("src") or "").strip()
        if src and not src.lower().startswith("data:"):
            url, url_attr = src, "src"
        elif (img.getattr("data-src") or "").strip():
            url, url_attr = img.getattr("data-src"), "data-src"
        elif (img.getattr("srcset") or "").strip():
            url, url_attr = largest_srcset(img.getattr("srcset")), "srcset"
        else:
            collector.reject(origin, "data_uri" if src else "no_image_url", src[:100])
            continue
        collector.add(url, text, base, page_url, origin, f"{url_attr}:{text_attr}")
    return images


# --- readers -------------------------------------------------------------------------------------


def _records(path: str, collector: Collector, record_type) -> Iterator:
    """WARC records of one type; a record that cannot be read ends the file with a reject that names
    the offset (a WARC cannot be resynchronised reliably), and the records before it are kept."""
    from fastwarc.warc import ArchiveIterator

    name = Path(path).name
    last = 0
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0)
        if head.startswith(b"filedesc"):
            collector.reject(f"{name}:0", "arc_format", "ARC files are not read; convert to WARC")
            return
        try:
            for record in ArchiveIterator(f, record_types=record_type):
                last = record.stream_pos
                yield record
        except (OSError, ValueError, EOFError) as e:
            log.warning("%s: unreadable WARC record after offset %d: %s", path, last, e)
            collector.reject(f"{name}:{last}", "bad_record", f"after offset {last}: {e}")


def read_warc(path: str, collector: Collector) -> dict:
    from fastwarc.warc import WarcRecordType

    name, pages = Path(path).name, 0
    for record in _records(path, collector, WarcRecordType.response):
        origin = f"{name}:{record.stream_pos}"
        try:
            content_type = (record.http_content_type or "").lower()
            if "html" not in content_type:
                continue
            page_url = (record.headers.get("WARC-Target-URI") or "").strip().strip("<>")
            body = record.reader.read()
            pages += 1
            html_images(collector, body, page_url, origin)
        except Exception as e:  # one bad page must not lose the file
            log.warning("%s: bad record at offset %d: %s", path, record.stream_pos, e)
            collector.reject(origin, "bad_record", str(e))
    return {"pages": pages}


def read_wat(path: str, collector: Collector) -> dict:
    """Common Crawl WAT: Envelope > Payload-Metadata > HTTP-Response-Metadata > HTML-Metadata >
    Links, where image links have path "IMG@/src", a url and usually an alt."""
    from fastwarc.warc import WarcRecordType

    name, pages = Path(path).name, 0
    for record in _records(path, collector, WarcRecordType.metadata):
        origin = f"{name}:{record.stream_pos}"
        try:
            envelope = json.loads(record.reader.read())["Envelope"]
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            collector.reject(origin, "bad_record", f"not WAT JSON: {e}")
            continue
        page_url = envelope.get("WARC-Header-Metadata", {}).get("WARC-Target-URI", "")
        html = envelope.get("Payload-Metadata", {}).get("HTTP-Response-Metadata", {}).get("HTML-Metadata")
        if not html:
            continue
        pages += 1
        base = page_url
        if html.get("Head", {}).get("Base"):
            base = normalise_url(html["Head"]["Base"], page_url)[0] or page_url
        for link in html.get("Links", []):
            if not str(link.get("path", "")).startswith("IMG@"):
                continue
            text, attr = (link.get("alt") or "", "alt")
            if not text.strip():
                text, attr = (link.get("title") or "", "title")
            if not text.strip():
                collector.reject(origin, "no_text", str(link.get("url", ""))[:200])
                continue
            collector.add(str(link.get("url", "")), text, base, page_url, origin, f"src:{attr}")
    return {"pages": pages}


def plan_input(path: str, kind: str, partition_rows: int) -> list[tuple[int, int | None]]:
    """Bounded partitions of one input, as (start, end): parquet row ranges; uncompressed CSV/TSV/JSONL
    byte ranges, each owning the lines that start in it, sized from the first megabyte's bytes per
    line; anything else (WARC, WAT, compressed lists) one partition, (0, None)."""
    if kind == "parquet":  # row ranges; a task reads only the row groups its range touches
        rows = pq.ParquetFile(path).metadata.num_rows
        return [(a, min(a + partition_rows, rows)) for a in range(0, rows, partition_rows)] or [(0, 0)]
    if kind in ("csv", "tsv", "jsonl") and not Path(path).name.lower().endswith((".gz", ".bz2", ".zst")):
        size = Path(path).stat().st_size
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        per_line = len(head) / max(head.count(b"\n"), 1)
        step = max(int(per_line * partition_rows), 1)
        if size <= step:
            return [(0, None)]
        return [(a, min(a + step, size)) for a in range(0, size, step)]
    return [(0, None)]


def _line_range(f, start: int, end: int | None) -> tuple[int, bytes]:
    """(offset, bytes) of the whole lines that start in [start, end): the Hadoop text-split rule, so
    adjacent ranges share no line and lose none."""
    if start > 0:
        f.seek(start - 1)
        f.readline()  # the line under way at start belongs to the previous range
    begin = f.tell()
    if end is None:
        return begin, f.read()
    data = f.read(max(end - begin, 0))
    if data and not data.endswith(b"\n"):
        data += f.readline()
    return begin, data


def _line_offsets(data: bytes, begin: int) -> np.ndarray:
    """Byte offsets of the non-blank lines of `data` (which starts at file offset `begin`)."""
    buf = np.frombuffer(data, np.uint8)
    if not len(buf):
        return np.zeros(0, np.int64)
    ends = np.flatnonzero(buf == 10)
    starts = np.r_[0, ends + 1]
    stops = np.r_[ends, len(buf)]
    blank = (stops - starts == 0) | ((stops - starts == 1) & (buf[np.minimum(starts, len(buf) - 1)] == 13))
    return begin + starts[~blank]


def read_list(path: str, kind: str, start: int, end: int | None) -> tuple[pa.Table, list[str]]:
    """One partition of a tabular list, and each row's origin: `file:row` for parquet, `file:offset`
    (the byte offset of the row's line) for text lists."""
    name = Path(path).name
    if kind == "parquet":
        f = pq.ParquetFile(path)
        stop = end if end is not None else f.metadata.num_rows
        tables, first = [], 0
        for g in range(f.metadata.num_row_groups):
            n = f.metadata.row_group(g).num_rows
            if first < stop and first + n > start:
                t = f.read_row_group(g)
                tables.append(t.slice(max(start - first, 0), min(stop, first + n) - max(start, first)))
            first += n
        table = pa.concat_tables(tables) if tables else f.schema_arrow.empty_table()
        return table, [f"{name}:{r}" for r in range(start, start + table.num_rows)]
    compressed = name.lower().endswith((".gz", ".bz2", ".zst"))
    if compressed:  # not splittable: one partition, rows numbered
        if kind == "jsonl":
            table = pajson.read_json(path)
        else:
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(
                delimiter="\t" if kind == "tsv" else ",", newlines_in_values=True))
        return table, [f"{name}:row {r}" for r in range(table.num_rows)]
    with open(path, "rb") as f:
        header = f.readline() if kind != "jsonl" else b""
        begin, data = _line_range(f, max(start, len(header)), end)
    if kind == "jsonl":
        table = pajson.read_json(io.BytesIO(data)) if data.strip() else pa.table({})
    else:  # every column as text: a partition's few rows must not change a column's type
        parse = pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", newlines_in_values=True)
        names = pacsv.read_csv(io.BytesIO(header), parse_options=parse).column_names
        table = pacsv.read_csv(io.BytesIO(header + data), parse_options=parse, convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names}))
    offsets = _line_offsets(data, begin)
    if len(offsets) != table.num_rows:  # quoted newlines inside values: lines are not rows
        return table, [f"{name}:{begin}+{r}" for r in range(table.num_rows)]
    return table, [f"{name}:{o}" for o in offsets.tolist()]


def read_table_part(path: str, kind: str, start: int, end: int | None, url_col: str, caption_col: str,
                    collector: Collector) -> dict:
    """img2dataset's input formats: parquet, CSV, TSV and JSON lines, with named columns."""
    try:
        table, origins = read_list(path, kind, start, end)
    except (pa.ArrowInvalid, OSError) as e:
        raise WitError(f"unreadable {kind} list: {e}", where=path) from None
    missing = [c for c in (url_col, caption_col) if c not in table.column_names]
    if missing and (table.num_rows or table.column_names):
        raise WitError(f"no column {', '.join(map(repr, missing))}; columns: "
                       f"{', '.join(table.column_names)} (set candidates.url_col / caption_col)",
                       where=path)
    if missing:
        return {"rows": 0}
    urls = table.column(url_col).cast(pa.string()).to_pylist()
    texts = table.column(caption_col).cast(pa.string()).to_pylist()
    for origin, url, text in zip(origins, urls, texts):
        if not text or not text.strip():
            collector.reject(origin, "no_text", url or "")
        elif url is None:
            collector.reject(origin, "no_image_url", "")
        else:
            collector.add(url, text, "", "", origin, f"{url_col}:{caption_col}")
    return {"rows": len(urls)}


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
    table = read_table(outputs["candidates"], columns=["uid", "url", "origin"])
    keys = [pa.table({"kind": pa.array(np.zeros(table.num_rows, np.uint8)), "key": uid_to_u64(table.column("uid"))})]
    if one_text_per_url:
        keys.append(pa.table({"kind": pa.array(np.ones(table.num_rows, np.uint8)),
                              "key": string_hash64(table.column("url"))}))
    rows = pa.array(np.arange(table.num_rows, dtype=np.uint32))
    records = pa.concat_tables([k.append_column("part", pa.array(np.full(table.num_rows, part, np.uint32)))
                                .append_column("row", rows).append_column("uid", table.column("uid"))
                                .append_column("origin", table.column("origin")) for k in keys])
    key = records.column("key").to_numpy()
    bucket = bucket_of(splitmix64(key ^ records.column("kind").to_numpy().astype(np.uint64)), buckets)
    scatter(records, bucket, shuffle, f"{part:06d}")
    return info


def part_key(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", Path(path).name)


KEY_SCHEMA = pa.schema([("kind", pa.uint8()), ("key", pa.uint64()), ("part", pa.uint32()),
                        ("row", pa.uint32()), ("uid", pa.string()), ("origin", pa.string())])
DUPLICATES_SCHEMA = pa.schema([("part", pa.uint32()), ("row", pa.uint32()), ("uid", pa.string()),
                               ("reason", pa.string()), ("first_origin", pa.string())])


def find_duplicates(shuffle: str, bucket: int, output: str) -> dict:
    """One bucket of the duplicate shuffle: the rows whose pair (uid) an earlier row already holds,
    and with one_text_per_url the later texts of a URL; earlier means by (partition, row)."""
    records = read_bucket(shuffle, bucket, KEY_SCHEMA)
    records = records.sort_by([("kind", "ascending"), ("key", "ascending"), ("part", "ascending"),
                               ("row", "ascending")])
    kind, key = records.column("kind").to_numpy(), records.column("key").to_numpy()
    same = np.r_[False, (kind[1:] == kind[:-1]) & (key[1:] == key[:-1])]
    first = np.maximum.accumulate(np.where(same, 0, np.arange(len(same))))  # the run's first row
    later = np.flatnonzero(same)
    reason = np.where(kind[later] == 0, "duplicate", "same_url")
    table = pa.table({
        "part": records.column("part").take(pa.array(later)), "row": records.column("row").take(pa.array(later)),
        "uid": records.column("uid").take(pa.array(later)), "reason": pa.array(reason, pa.string()),
        "first_origin": records.column("origin").take(pa.array(first[later]))}, schema=DUPLICATES_SCHEMA)
    # A row that repeats both a pair and a URL is a `duplicate`: keep one reason per row.
    table = table.sort_by([("part", "ascending"), ("row", "ascending"), ("reason", "ascending")])
    if table.num_rows:
        p, r = table.column("part").to_numpy(), table.column("row").to_numpy()
        table = table.filter(pa.array(np.r_[True, (p[1:] != p[:-1]) | (r[1:] != r[:-1])]))
    write_parquet(table, output, row_group_size=SLICE_ROW_GROUP)
    return {"duplicates": table.num_rows}


class CandidatesStage(Stage):
    name = "candidates"

    def plan(self, run: Run):
        c = run.recipe.candidates
        out = run.stage_dir(self.name)
        parts, total_bytes = [], 0
        for path in run.recipe.paths(c.inputs, "candidates.inputs"):
            if not Path(path).is_file():
                raise WitError("input file not found", where=path)
            kind = input_kind(path)
            ranges = plan_input(path, kind, c.partition_rows)
            size = Path(path).stat().st_size
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
        namespace = fingerprint({**settings, "parts": [(p[0], p[5], p[3], p[4]) for p in parts]})[:12]
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
