"""Streaming reader for MediaWiki XML dumps (.xml, .xml.bz2, bz2 multistream).

Memory stays bounded whatever the dump size: decompressed bytes are read in chunks and cut into
`<page>` elements, each parsed on its own. A multistream dump (with its `-index.txt.bz2` beside it) is
split into byte ranges of whole bz2 streams, so one file can be counted by many workers.

Errors name the file and the offset: compressed offsets for bz2 problems, uncompressed offsets (and the
page title) for XML and UTF-8 problems.
"""

from __future__ import annotations

import bz2
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from wit_builder.errors import WitError

CHUNK = 1 << 20
_TITLE = re.compile(rb"<title>(.*?)</title>", re.S)


@dataclass(frozen=True)
class DumpPart:
    """A whole dump file, or the compressed byte range [start, end) of whole bz2 streams in one."""

    path: str
    start: int = 0
    end: int | None = None

    @property
    def key(self) -> str:
        stem = re.sub(r"[^A-Za-z0-9.-]+", "_", Path(self.path).name)
        return stem if self.end is None else f"{stem}@{self.start}-{self.end}"


def index_path(dump: str) -> Path | None:
    """Wikipedia names the index of `X-multistream.xml.bz2` as `X-multistream-index.txt.bz2`."""
    name = Path(dump).name
    if not name.endswith(".xml.bz2"):
        return None
    candidate = Path(dump).with_name(name[: -len(".xml.bz2")] + "-index.txt.bz2")
    return candidate if candidate.exists() else None


def plan_parts(dump: str, partition_bytes: int) -> list[DumpPart]:
    """Partitions of one dump: byte ranges when a multistream index is beside it, else the file."""
    if not os.path.exists(dump):
        raise WitError("dump file not found", where=dump)
    size = os.path.getsize(dump)
    if size == 0:
        raise WitError("empty dump: the file has no bytes", where=dump)
    index = index_path(dump)
    if index is None:
        return [DumpPart(dump)]
    offsets = sorted(set(_read_index_offsets(index)))
    if not offsets or offsets[-1] >= size:
        raise WitError(f"index does not match the dump ({len(offsets)} offsets, dump {size} bytes)",
                       where=str(index))
    # The streams before the first page (the <siteinfo> header) are skipped by starting at offset 0.
    starts = [0] + [o for o in offsets if o > 0]
    parts, begin = [], 0
    for s in starts[1:]:
        if s - begin >= partition_bytes:
            parts.append(DumpPart(dump, begin, s))
            begin = s
    parts.append(DumpPart(dump, begin, size))
    return parts


def _read_index_offsets(index: Path) -> Iterator[int]:
    try:
        with bz2.open(index, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                head = line.split(":", 1)[0]
                if not head.isdigit():
                    raise WitError("not an `offset:page_id:title` line", where=str(index),
                                   record=f"line {lineno}")
                yield int(head)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise WitError(f"unreadable multistream index: {e}", where=str(index)) from None


def _chunks(part: DumpPart) -> Iterator[bytes]:
    """Decompressed bytes of a part, with bz2 failures turned into errors that name the offset."""
    path = part.path
    with open(path, "rb") as raw:
        head = raw.read(3)
        raw.seek(0)
        if head != b"BZh":
            if path.endswith(".bz2"):
                raise WitError("not a bz2 file (no 'BZh' header)", where=path, record="byte 0")
            while chunk := raw.read(CHUNK):
                yield chunk
            return
        raw.seek(part.start)
        end = part.end if part.end is not None else os.path.getsize(path)
        stream_start = part.start
        decomp = bz2.BZ2Decompressor()
        pos = part.start
        while pos < end:
            data = raw.read(min(CHUNK, end - pos))
            if not data:
                break
            pos += len(data)
            while data:
                try:
                    out = decomp.decompress(data)
                except OSError as e:
                    raise WitError(f"corrupt bz2 data: {e}", where=path,
                                   record=f"bz2 stream at compressed byte {stream_start}") from None
                if out:
                    yield out
                if decomp.eof:
                    # The next bz2 stream of a multistream file starts right after this one.
                    data = decomp.unused_data
                    stream_start = pos - len(data)
                    decomp = bz2.BZ2Decompressor()
                else:
                    data = b""
        if not decomp.eof and (pos > stream_start):
            raise WitError(
                "truncated bz2: the data ends before the end of a stream", where=path,
                record=f"bz2 stream starting at compressed byte {stream_start}, file ends at {pos}",
            )


@dataclass
class Page:
    offset: int  # uncompressed byte offset of `<page>` within the part
    title: str
    ns: int
    redirect: bool
    text: str


class PageError(Exception):
    """One page could not be read; the rest of the dump still is."""

    def __init__(self, offset: int, title: str, reason: str):
        self.offset, self.title, self.reason = offset, title, reason
        super().__init__(f"uncompressed byte {offset}, page {title!r}: {reason}")


def iter_page_bytes(part: DumpPart) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of each `<page>...</page>` element, in order."""
    buf = bytearray()
    base = 0  # uncompressed offset of buf[0]
    found = False
    for chunk in _chunks(part):
        buf += chunk
        pos = 0
        while True:
            start = buf.find(b"<page>", pos)
            if start < 0:
                pos = max(pos, len(buf) - 6)  # keep a possible partial "<page" tag
                break
            end = buf.find(b"</page>", start)
            if end < 0:
                pos = start
                break
            found = True
            yield base + start, bytes(buf[start : end + 7])
            pos = end + 7
        del buf[:pos]
        base += pos
    start = buf.find(b"<page>")
    if start >= 0:
        m = _TITLE.search(buf, start)
        title = m.group(1).decode("utf-8", "replace") if m else "?"
        raise WitError(f"dump ends inside page {title!r} (truncated XML)", where=part.path,
                       record=f"uncompressed byte {base + start}")
    if not found and part.start == 0:
        raise WitError("empty dump: no <page> elements found", where=part.path)


def parse_page(offset: int, data: bytes) -> Page:
    try:
        el = ET.fromstring(data)
    except ET.ParseError as e:
        m = _TITLE.search(data)
        title = m.group(1).decode("utf-8", "replace") if m else "?"
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as u:
            raise PageError(offset + u.start, title, f"invalid UTF-8 ({u.reason})") from None
        raise PageError(offset, title, f"malformed XML: {e}") from None
    text = el.findtext("revision/text") or ""
    return Page(
        offset=offset,
        title=el.findtext("title") or "",
        ns=int(el.findtext("ns") or 0),
        redirect=el.find("redirect") is not None,
        text=text,
    )


def write_multistream(pages_xml: bytes, header: bytes, footer: bytes, out: Path, index_out: Path,
                      pages_per_stream: int = 100) -> None:
    """Write a multistream dump and its index from page elements, the way Wikipedia lays them out:
    the header in its own stream, then `pages_per_stream` pages per stream, then the footer."""
    pages = re.findall(rb"  <page>.*?</page>\n", pages_xml, re.S)
    streams = [header] + [b"".join(pages[i : i + pages_per_stream])
                          for i in range(0, len(pages), pages_per_stream)] + [footer]
    index_lines, offset = [], 0
    with open(out, "wb") as f:
        for i, stream in enumerate(streams):
            if 0 < i < len(streams) - 1:
                for page in re.findall(rb"<page>.*?</page>", stream, re.S):
                    pid = re.search(rb"<id>(\d+)</id>", page).group(1).decode()
                    title = _TITLE.search(page).group(1).decode()
                    index_lines.append(f"{offset}:{pid}:{title}\n")
            data = bz2.compress(stream)
            f.write(data)
            offset += len(data)
    with bz2.open(index_out, "wt", encoding="utf-8") as f:
        f.writelines(index_lines)
