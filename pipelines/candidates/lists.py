"""Tabular lists (parquet, CSV, TSV, JSONL) read in bounded partitions, every bad row rejected with why."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from wit_builder import storage
from wit_builder.errors import WitError

from .collector import Collector

log = logging.getLogger("wit")


def plan_input(path: str, kind: str, partition_rows: int) -> list[tuple[int, int | None]]:
    """Bounded partitions of one input, as (start, end): parquet row ranges; uncompressed CSV/TSV/JSONL
    byte ranges, each owning the lines that start in it, sized from the first megabyte's bytes per
    line; anything else (WARC, WAT, compressed lists) one partition, (0, None)."""
    if kind == "parquet":  # row ranges; a task reads only the row groups its range touches
        try:
            with storage.open_input(path) as f:
                rows = pq.ParquetFile(f).metadata.num_rows
        except pa.ArrowException:  # not parquet: one partition, whose task names the file and fails
            return [(0, None)]
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
            try:
                f = pq.ParquetFile(handle)
            except pa.ArrowException as e:
                raise WitError(f"not a readable parquet file ({e})", where=path) from None
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
