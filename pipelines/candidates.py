"""Candidates: (image url, alt text) pairs from WARC, WAT and tabular lists.

One partition per input file. Each writes `candidates/part-<key>.parquet` (uid, url, text, page_url,
origin, attribute) and `candidates/rejects/part-<key>.parquet` (origin, reason, detail): every image
that was not kept and every unreadable record, with why. A reduce then marks the pairs that an earlier
partition already holds (and, with `one_text_per_url`, later texts of a URL) in
`candidates/duplicates.parquet`, which the filter stage drops with a reason.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from wit_builder.errors import WitError
from wit_builder.ids import uid
from wit_builder.runner import Stage, Task
from wit_builder.workspace import Run, file_identity, write_parquet

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


def read_table(path: str, kind: str, url_col: str, caption_col: str, collector: Collector) -> dict:
    """img2dataset's input formats: parquet, CSV, TSV and JSON lines, with named columns."""
    try:
        if kind == "parquet":
            table = pq.read_table(path)
        elif kind in ("csv", "tsv"):
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(
                delimiter="\t" if kind == "tsv" else ",", newlines_in_values=True))
        else:
            table = pajson.read_json(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise WitError(f"unreadable {kind} list: {e}", where=path) from None
    missing = [c for c in (url_col, caption_col) if c not in table.column_names]
    if missing:
        raise WitError(f"no column {', '.join(map(repr, missing))}; columns: "
                       f"{', '.join(table.column_names)} (set candidates.url_col / caption_col)",
                       where=path)
    name = Path(path).name
    urls = table.column(url_col).cast(pa.string()).to_pylist()
    texts = table.column(caption_col).cast(pa.string()).to_pylist()
    for row, (url, text) in enumerate(zip(urls, texts)):
        if not text or not text.strip():
            collector.reject(f"{name}:{row}", "no_text", url or "")
        elif url is None:
            collector.reject(f"{name}:{row}", "no_image_url", "")
        else:
            collector.add(url, text, "", "", f"{name}:{row}", f"{url_col}:{caption_col}")
    return {"rows": len(urls)}


def candidates_part(path: str, kind: str, url_col: str, caption_col: str, outputs: dict) -> dict:
    """The task function: one input file in, its candidates and rejects out."""
    collector = Collector()
    if kind == "warc":
        info = read_warc(path, collector)
    elif kind == "wat":
        info = read_wat(path, collector)
    elif kind == "arc":
        collector.reject(f"{Path(path).name}:0", "arc_format", "ARC files are not read; convert to WARC")
        info = {}
    else:
        info = read_table(path, kind, url_col, caption_col, collector)
    return {**info, **collector.write(outputs)}


def part_key(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", Path(path).name)


class CandidatesStage(Stage):
    name = "candidates"

    def tasks(self, run: Run) -> list[Task]:
        c = run.recipe.candidates
        out = run.stage_dir(self.name)
        tasks = []
        for path in run.recipe.paths(c.inputs, "candidates.inputs"):
            if not Path(path).is_file():
                raise WitError("input file not found", where=path)
            key = part_key(path)
            outputs = {"candidates": str(out / f"part-{key}.parquet"),
                       "rejects": str(out / "rejects" / f"part-{key}.parquet")}
            kind = input_kind(path)
            tasks.append(Task(
                stage=self.name, key=key, func=candidates_part,
                kwargs={"path": path, "kind": kind, "url_col": c.url_col, "caption_col": c.caption_col,
                        "outputs": outputs},
                outputs=list(outputs.values()), marker=str(run.marker_path(self.name, key)),
                inputs={"version": VERSION, "file": file_identity(path), "kind": kind,
                        "cols": [c.url_col, c.caption_col]},
                weight=Path(path).stat().st_size,
            ))
        keys = [t.key for t in tasks]
        if len(set(keys)) != len(keys):
            raise WitError("two inputs have the same file name; rename one", where="candidates.inputs")
        return tasks

    def reduce_task(self, run: Run, tasks: list[Task]) -> Task | None:
        if not tasks:
            return None
        out = run.stage_dir(self.name) / "duplicates.parquet"
        return Task(stage=self.name, key="_reduce", func=find_duplicates,
                    kwargs={"parts": [t.kwargs["outputs"]["candidates"] for t in tasks],
                            "one_text_per_url": run.recipe.candidates.one_text_per_url,
                            "output": str(out)},
                    outputs=[str(out)], marker=str(run.marker_path(self.name, "_reduce")),
                    inputs={"version": VERSION, "parts": [t.fingerprint for t in tasks],
                            "one_text_per_url": run.recipe.candidates.one_text_per_url})


def find_duplicates(parts: list[str], one_text_per_url: bool, output: str) -> dict:
    """The pairs an earlier partition already holds (same uid), and with one_text_per_url the later
    texts of a URL: (part, row, uid, reason, first_origin). First means first in partition order."""
    con = duckdb.connect()
    con.execute("CREATE TABLE c AS SELECT uid, url, origin, list_position($parts, filename) AS part, "
                "file_row_number AS row FROM read_parquet($parts, filename=true, file_row_number=true)",
                {"parts": parts})
    url_rule = ("WHEN row_number() OVER (PARTITION BY url ORDER BY part, row) > 1 THEN 'same_url'"
                if one_text_per_url else "")
    table = con.sql(f"""
        SELECT part - 1 AS part, row, uid, reason, first_origin FROM (
            SELECT part, row, uid,
                   CASE WHEN row_number() OVER (PARTITION BY uid ORDER BY part, row) > 1 THEN 'duplicate'
                        {url_rule} END AS reason,
                   CASE WHEN row_number() OVER (PARTITION BY uid ORDER BY part, row) > 1
                        THEN first_value(origin) OVER (PARTITION BY uid ORDER BY part, row)
                        ELSE first_value(origin) OVER (PARTITION BY url ORDER BY part, row) END
                        AS first_origin
            FROM c)
        WHERE reason IS NOT NULL ORDER BY part, row
    """).to_arrow_table()
    write_parquet(table, output)
    return {"duplicates": table.num_rows}
