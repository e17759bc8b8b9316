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

from wit_builder import storage
from wit_builder.errors import WitError
from wit_builder.ids import fingerprint, uid
from wit_builder.runner import (Manifest, Stage, Task, combined_fingerprint, completed, partition_entry,
                                step_info)
from wit_builder.shuffle import (FORMAT as SHUFFLE_FORMAT, SLICE_ROW_GROUP, bucket_of, read_bucket, scatter,
                                 splitmix64, string_hash64, uid_to_u64)
from wit_builder.workspace import Run, file_identity, read_table, write_parquet

from .urls import normalise_url

log = logging.getLogger("wit")
VERSION = 3

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


def html_images(collector: Collector, body: bytes, page_url: str, origin: str, charset: str | None = None) -> int:
    """Every <img> with a text (alt, else title) and a usable URL (src, else data-src, else the
    largest srcset entry), resolved against <base href> or the page URL. Decoded as browsers do: by
    the HTTP header's charset, else the page's <meta charset>, else a guess from the bytes."""
    from resiliparse.parse.encoding import detect_encoding, map_encoding_to_html5
    from resiliparse.parse.html import HTMLTree

    encoding = (map_encoding_to_html5(charset, fallback_utf8=False) if charset else None) or \
        detect_encoding(body, from_html_meta=True)
    tree = HTMLTree.parse_from_bytes(body, encoding)
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
    """The WARC records of one type. A record that cannot be parsed ends the file with a `bad_record`
    reject naming the last good record's offset ("after offset ..."); one whose header or payload is
    cut short, or a gzip member that ends early or breaks, with one naming its own ("at offset ...").
    A WARC cannot be resynchronised reliably; the records before are kept.

    A consumer that reads a record's payload and gets fewer bytes than `record.content_length` must
    skip it: the check runs when the consumer asks for the next record. Records of other types are
    read through too, so a cut anywhere is found."""
    from fastwarc.warc import ArchiveIterator

    name = Path(path).name
    last = 0
    with storage.open_input(path) as f:
        head = f.read(8)
        f.seek(0)
        if head.startswith(b"filedesc"):
            collector.reject(f"{name}:0", "arc_format", "ARC files are not read; convert to WARC")
            return
        try:
            for record in ArchiveIterator(f, parse_http=False):
                pos = record.stream_pos
                if not (record.headers.get("Content-Length") or "").strip().isdigit():
                    _cut(collector, path, pos, "record header cut short (no Content-Length)")
                    return
                if record.record_type & record_type:
                    yield record
                # content_length and tell() count from the payload when HTTP headers were parsed,
                # else from the start of the block: either way the payload must fill content_length.
                expected = record.content_length
                record.reader.consume()
                if record.reader.tell() < expected:
                    _cut(collector, path, pos, f"record cut short: {record.reader.tell()} of {expected} "
                                               "payload bytes (file truncated?)")
                    return
                last = pos
        except (OSError, ValueError, EOFError) as e:
            log.warning("%s: unreadable WARC record after offset %d: %s", path, last, e)
            collector.reject(f"{name}:{last}", "bad_record", f"after offset {last}: {e}")
            return
    if head.startswith(b"\x1f\x8b") and (where := _gzip_break(path, last)) is not None:
        _cut(collector, path, where[0], where[1])


def _cut(collector: Collector, path: str, offset: int, why: str) -> None:
    log.warning("%s: %s at offset %d; the records before it are kept", path, why, offset)
    collector.reject(f"{Path(path).name}:{offset}", "bad_record", f"at offset {offset}: {why}")


def _gzip_break(path: str, start: int) -> tuple[int, str] | None:
    """(offset of the gzip member, why) where a .gz file stops being whole gzip, checked from the member
    at `start` (the last good record's) to the end; None when it is whole. fastwarc ends a cut gzip
    stream silently. A file that is one gzip stream, not one member per record, is checked from 0."""
    import zlib

    with storage.open_input(path) as f:
        f.seek(start)
        if f.read(2) != b"\x1f\x8b":
            start = 0
        f.seek(start)
        member, fed, buf = start, 0, b""
        inflate = zlib.decompressobj(31)
        while True:
            if not buf:
                buf = f.read(1 << 20)
                if not buf:
                    return None if fed == 0 else (member, "gzip stream ends early (file truncated?)")
            try:
                inflate.decompress(buf, 1 << 22)  # the output is not needed, only that it inflates
            except zlib.error as e:
                return member, f"broken gzip member: {e}"
            if inflate.eof:
                rest = inflate.unused_data
                member += fed + len(buf) - len(rest)
                fed, buf = 0, rest
                inflate = zlib.decompressobj(31)
            else:
                fed += len(buf) - len(inflate.unconsumed_tail)
                buf = inflate.unconsumed_tail


def _parse_http(record) -> None:
    """HTTP headers, those whose lines end in a bare LF (older crawls) too."""
    try:
        record.parse_http(quirks_mode=True)  # fastwarc >= 2
    except TypeError:
        record.parse_http(strict_mode=False)  # older fastwarc: non-strict accepts LF-only lines


_HTML_START = re.compile(rb"(?:\xef\xbb\xbf)?\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body)[\s>]",
                         re.I | re.S)


def read_warc(path: str, collector: Collector) -> dict:
    """HTML responses' images. Every other response is a `not_html` reject naming its content type;
    a response without one is read as HTML when its payload starts like HTML."""
    from fastwarc.warc import WarcRecordType

    name, pages, responses = Path(path).name, 0, 0
    for record in _records(path, collector, WarcRecordType.response):
        origin = f"{name}:{record.stream_pos}"
        responses += 1
        try:
            _parse_http(record)
            content_type = (record.http_content_type or "").lower()
            if content_type and "html" not in content_type:
                collector.reject(origin, "not_html", content_type)
                continue
            body = record.reader.read(1024) if not content_type else b""
            if not content_type and not _HTML_START.match(body):
                collector.reject(origin, "not_html", "no content type" if record.is_http else
                                 f"not HTTP: {record.headers.get('Content-Type') or 'no content type'}")
                continue
            body += record.reader.read()
            if len(body) < record.content_length:
                continue  # cut short: _records rejects it and ends the file
            page_url = (record.headers.get("WARC-Target-URI") or "").strip().strip("<>")
            pages += 1
            html_images(collector, body, page_url, origin, record.http_charset)
        except Exception as e:  # one bad page must not lose the file
            log.warning("%s: bad record at offset %d: %s", path, record.stream_pos, e)
            collector.reject(origin, "bad_record", str(e))
    if not pages:
        log.warning("%s: no HTML pages in %d responses", path, responses)
    return {"pages": pages}


def read_wat(path: str, collector: Collector) -> dict:
    """Common Crawl WAT: Envelope > Payload-Metadata > HTTP-Response-Metadata > HTML-Metadata >
    Links, where image links have path "IMG@/src", a url and usually an alt."""
    from fastwarc.warc import WarcRecordType

    name, pages = Path(path).name, 0
    for record in _records(path, collector, WarcRecordType.metadata):
        origin = f"{name}:{record.stream_pos}"
        body = record.reader.read()
        if len(body) < record.content_length:
            continue  # cut short: _records rejects it and ends the file
        try:
            envelope = json.loads(body)["Envelope"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            collector.reject(origin, "bad_record", f"not WAT JSON: {e}")
            continue
        page_url = envelope.get("WARC-Header-Metadata", {}).get("WARC-Target-URI", "")
        response = envelope.get("Payload-Metadata", {}).get("HTTP-Response-Metadata", {})
        html = response.get("HTML-Metadata")
        if not html:
            if envelope.get("WARC-Header-Metadata", {}).get("WARC-Type") == "response":
                collector.reject(origin, "not_html", str((response.get("Headers") or {}).get(
                    "Content-Type") or "no content type"))
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
    if not pages:
        log.warning("%s: no HTML pages", path)
    return {"pages": pages}


def plan_input(path: str, kind: str, partition_rows: int) -> list[tuple[int, int | None]]:
    """Bounded partitions of one input, as (start, end): parquet row ranges; uncompressed CSV/TSV/JSONL
    byte ranges, each owning the lines that start in it, sized from the first megabyte's bytes per
    line; anything else (WARC, WAT, compressed lists) one partition, (0, None)."""
    if kind == "parquet":  # row ranges; a task reads only the row groups its range touches
        with storage.open_input(path) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        return [(a, min(a + partition_rows, rows)) for a in range(0, rows, partition_rows)] or [(0, 0)]
    if kind in ("csv", "tsv", "jsonl") and not Path(path).name.lower().endswith((".gz", ".bz2", ".zst")):
        size = storage.size(path)
        with storage.open_input(path) as f:
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


def read_list(path: str, kind: str, start: int, end: int | None,
              rejects: list[tuple[str, str]] | None = None) -> tuple[pa.Table, list[str]]:
    """One partition of a tabular list, and each row's origin: `file:row` for parquet, `file:offset`
    (the byte offset of the row's line) for text lists.

    A text list is read by pyarrow's vectorised reader; when that refuses the partition (a row with
    the wrong number of fields, bytes that are not UTF-8, a line that is not JSON) it is read again
    row by row, and each bad row is appended to `rejects` as (origin, detail) while the rest are kept.
    Without `rejects`, a bad row raises pa.ArrowInvalid naming its origin."""
    name = Path(path).name
    if kind == "parquet":
        with storage.open_input(path) as handle:
            f = pq.ParquetFile(handle)
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
    delimiter = "\t" if kind == "tsv" else ","
    compressed = name.lower().endswith((".gz", ".bz2", ".zst"))
    if compressed:  # not splittable: one partition, rows numbered
        codec = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}[Path(name.lower()).suffix]
        with storage.open_input(path) as f, pa.input_stream(f, compression=codec) as stream:
            data = stream.read()
        header = b"" if kind == "jsonl" else data[: data.find(b"\n") + 1 or len(data)]
        begin, data = len(header), data[len(header):]
    else:
        with storage.open_input(path) as f:
            header = f.readline() if kind != "jsonl" else b""
            begin, data = _line_range(f, max(start, len(header)), end)
    names = _column_names(header, delimiter)
    table = _read_text(kind, header, names, data, delimiter)
    offsets = _line_offsets(data, begin)
    if table is not None and (kind != "jsonl" or len(offsets) == table.num_rows):
        if compressed:
            return table, [f"{name}:row {r}" for r in range(table.num_rows)]
        if len(offsets) != table.num_rows:  # quoted newlines inside values: lines are not rows
            return table, [f"{name}:{begin}+{r}" for r in range(table.num_rows)]
        return table, [f"{name}:{o}" for o in offsets.tolist()]
    # Refused (or, in JSON lines, a broken line read together with the next): row by row.
    table, records, lines, bad = _rows_one_by_one(kind, header, names, data, delimiter)
    starts = begin + _line_starts(data)
    above = 1 if header and begin == len(header) else 0  # the first range counts the header's line
    for line, why in bad:
        number = line + above + 1
        if compressed:
            _bad_row(rejects, f"{name}:line {number}", f"line {number}: {why}")
        else:
            _bad_row(rejects, f"{name}:{starts[line]}",
                     f"line {number} of the range starting at byte {0 if above else begin}: {why}")
    if compressed:
        return table, [f"{name}:row {r}" for r in records.tolist()]
    return table, [f"{name}:{o}" for o in starts[lines].tolist()]


def _read_text(kind: str, header: bytes, names: list[str], data: bytes, delimiter: str) -> pa.Table | None:
    """The fast path: pyarrow's vectorised reader; None when it refuses the text."""
    try:
        if kind == "jsonl":  # pyarrow's JSON reader takes bytes that are not UTF-8 into its strings
            data.decode("utf-8")
            return pajson.read_json(io.BytesIO(data)) if data.strip() else pa.table({})
        # every column as text: a partition's few rows must not change a column's type
        return pacsv.read_csv(io.BytesIO(header + data), parse_options=pacsv.ParseOptions(
            delimiter=delimiter, newlines_in_values=True), convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names}))
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None


def _column_names(header: bytes, delimiter: str) -> list[str]:
    if not header:
        return []
    parse = pacsv.ParseOptions(delimiter=delimiter)
    return pacsv.read_csv(io.BytesIO(header), parse_options=parse).column_names


def _bad_row(rejects: list | None, origin: str, detail: str) -> None:
    if rejects is None:
        raise pa.ArrowInvalid(f"{origin}: {detail}")
    rejects.append((origin, detail))


def _line_starts(data: bytes) -> np.ndarray:
    """The offset in `data` of every line, blank ones too."""
    return np.r_[0, np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + 1].astype(np.int64)


def _nonblank(data: bytes, starts: np.ndarray) -> np.ndarray:
    """The indices of the lines that are not blank (nor a lone CR): those a reader makes rows of."""
    stops = np.r_[starts[1:] - 1, len(data)]
    buf = np.frombuffer(data, np.uint8)
    cr = (stops - starts == 1) & (buf[np.minimum(starts, max(len(buf) - 1, 0))] == 13) if len(buf) else False
    return np.flatnonzero((stops > starts) & ~cr)


def _bad_utf8(data: bytes) -> list[tuple[int, int]]:
    """(offset, value) of the first byte that is not UTF-8 in each line that has one."""
    import codecs

    view, pos, found = memoryview(data), 0, []
    while pos < len(data):
        try:
            codecs.utf_8_decode(view[pos:], "strict", True)
            break
        except UnicodeDecodeError as e:
            at = pos + e.start
            found.append((at, data[at]))
            pos = data.find(b"\n", at) + 1 or len(data)
    return found


Rows = tuple[pa.Table, np.ndarray, np.ndarray, list[tuple[int, str]]]


def _rows_one_by_one(kind: str, header: bytes, names: list[str], data: bytes, delimiter: str) -> Rows:
    """The slow path, for text a vectorised reader refused: the good rows as a table, each good row's
    record number and line, and each bad row's (line, why). Lines count from 0 in `data` (blank ones
    too), records from 0 among the rows, good and bad."""
    if kind == "jsonl":
        return _jsonl_rows(data)
    return _csv_rows(header, names, data, delimiter) or _csv_rows_python(names, data, delimiter)


def _csv_rows(header: bytes, names: list[str], data: bytes, delimiter: str) -> Rows | None:
    """Lines that are not UTF-8 are cut out, then pyarrow reads the rest and hands over each row with
    the wrong number of fields; None when rows span lines (quoted newlines), which this cannot place."""
    starts = _line_starts(data)
    utf8 = [(int(np.searchsorted(starts, at, "right")) - 1, value) for at, value in _bad_utf8(data)]
    pieces, prev = [], 0
    for line, _ in utf8:  # each bad line is emptied, so the other lines keep their numbers
        pieces.append(data[prev:starts[line]])
        prev = starts[line + 1] - 1 if line + 1 < len(starts) else len(data)
    clean = b"".join(pieces) + data[prev:] if utf8 else data
    ragged: list[tuple[int | None, int]] = []

    def skip(row) -> str:
        ragged.append((row.number, row.actual_columns))
        return "skip"

    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True, invalid_row_handler=skip)
    try:  # one thread, so that each skipped row comes with its number
        table = pacsv.read_csv(io.BytesIO(header + clean), read_options=pacsv.ReadOptions(use_threads=False),
                               parse_options=parse, convert_options=pacsv.ConvertOptions(
                                   column_types={n: pa.string() for n in names}))
    except pa.ArrowInvalid:
        return None
    rows = _nonblank(data, starts)
    seen = np.ones(len(rows), bool)
    seen[np.searchsorted(rows, [line for line, _ in utf8]).astype(np.int64)] = False
    lines = rows[seen]  # the rows pyarrow saw, in order
    if len(lines) != table.num_rows + len(ragged) or any(n is None for n, _ in ragged):
        return None
    skipped = np.array([n - 2 for n, _ in ragged], np.int64)  # row.number counts the header as 1
    bad = [(line, f"invalid UTF-8 (byte 0x{value:02x})") for line, value in utf8]
    bad += [(int(lines[i]), f"Expected {len(names)} columns, got {got}")
            for i, (_, got) in zip(skipped.tolist(), ragged)]
    good = np.delete(lines, skipped)
    return table, np.searchsorted(rows, good), good, sorted(bad)


_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, after surrogateescape


def _csv_rows_python(names: list[str], data: bytes, delimiter: str) -> Rows:
    """Python's csv module, row by row: for rows that span lines."""
    import csv

    pieces = data.decode("utf-8", "surrogateescape").split("\n")
    if pieces[-1] == "":
        pieces.pop()
    reader = csv.reader((p + "\n" for p in pieces), delimiter=delimiter, strict=False)
    good, records, lines, bad, n = [], [], [], [], 0
    while True:
        line = reader.line_num  # the lines read so far: this row starts on the next one
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            bad.append((line, str(e)))
            n += 1
            continue
        if not row:  # a blank line
            continue
        escaped = next((m for m in map(_ESCAPED.search, row) if m), None)
        if escaped:
            bad.append((line, f"invalid UTF-8 (byte 0x{ord(escaped.group()) - 0xDC00:02x})"))
        elif len(row) != len(names):
            bad.append((line, f"Expected {len(names)} columns, got {len(row)}"))
        else:
            good.append(row)
            records.append(n)
            lines.append(line)
        n += 1
    columns = list(zip(*good)) if good else [[] for _ in names]
    table = pa.Table.from_arrays([pa.array(c, pa.string()) for c in columns], names=names)
    return table, np.array(records, np.int64), np.array(lines, np.int64), bad


def _json_object(raw: bytes) -> tuple[dict | None, str]:
    """A JSON line's object, or None and why not."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    except ValueError as e:
        return None, f"not JSON: {e}"
    if not isinstance(row, dict):
        return None, f"not a JSON object: {raw[:60].decode('utf-8', 'replace')}"
    return row, ""


def _jsonl_rows(data: bytes) -> Rows:
    """A block of lines that pyarrow reads as one row a line is good; the lines of a block it refuses
    are checked one by one with Python's json. The good lines are then read by pyarrow again, or, when
    their types clash (a number here, a string there), built in Python with the odd values as JSON
    text."""
    starts = _line_starts(data)
    stops = np.r_[starts[1:] - 1, len(data)]
    buf = np.frombuffer(data, np.uint8)
    rows = np.flatnonzero(stops > starts)
    lead = buf[starts[rows]]
    odd = rows[(lead == 32) | (lead == 9) | (lead == 13)]  # lines that may be only white space
    if len(odd):
        blank = [line for line in odd.tolist() if not data[starts[line]:stops[line]].strip()]
        rows = np.setdiff1d(rows, blank)
    bad = []
    for first in range(0, len(rows), _JSON_BLOCK):
        block = rows[first:first + _JSON_BLOCK]
        try:
            chunk = data[starts[block[0]]:stops[block[-1]]]
            chunk.decode("utf-8")  # pyarrow would take bytes that are not UTF-8
            if pajson.read_json(io.BytesIO(chunk)).num_rows == len(block):
                continue
        except (pa.ArrowInvalid, UnicodeDecodeError):
            pass
        for line in block.tolist():
            row, why = _json_object(data[starts[line]:stops[line]])
            if row is None:
                bad.append((line, why))
    good, clean = rows, data
    if bad:
        keep = np.ones(len(rows), bool)
        keep[np.searchsorted(rows, [line for line, _ in bad])] = False
        good = rows[keep]
        pieces, prev = [], 0
        for line, _ in bad:  # each bad line emptied
            pieces.append(data[prev:starts[line]])
            prev = stops[line]
        clean = b"".join(pieces) + data[prev:]
    try:
        table = pajson.read_json(io.BytesIO(clean)) if len(good) else pa.table({})
        if table.num_rows != len(good):
            raise pa.ArrowInvalid("rows and lines differ")
    except pa.ArrowInvalid:
        dicts, kept = [], []
        for line in good.tolist():
            row, why = _json_object(data[starts[line]:stops[line]])
            if row is None:
                bad.append((line, why))
            else:
                dicts.append(row)
                kept.append(line)
        good, bad = np.array(kept, np.int64), sorted(bad)
        columns = {}
        for key in dict.fromkeys(k for row in dicts for k in row):
            values = [row.get(key) for row in dicts]
            try:
                columns[key] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                columns[key] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v)
                                         for v in values], pa.string())
        table = pa.table(columns)
    return table, np.searchsorted(rows, good), good, bad


_JSON_BLOCK = 4096  # lines pyarrow checks at once in the slow path


def read_table_part(path: str, kind: str, start: int, end: int | None, url_col: str, caption_col: str,
                    collector: Collector) -> dict:
    """img2dataset's input formats: parquet, CSV, TSV and JSON lines, with named columns."""
    bad: list[tuple[str, str]] = []
    try:
        table, origins = read_list(path, kind, start, end, bad)
    except (pa.ArrowInvalid, OSError) as e:
        raise WitError(f"unreadable {kind} list: {e}", where=path) from None
    for origin, detail in bad:
        collector.reject(origin, "bad_row", detail)
    if bad:
        log.warning("%s: %d unreadable rows rejected (first: %s, %s)", path, len(bad), *bad[0])
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
    scatter(records, bucket, shuffle, f"{part:06d}", buckets, compression="lz4")  # uids and origins: text
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
