"""Streaming reader for MediaWiki XML dumps (.xml, .xml.bz2, bz2 multistream).

Memory stays bounded whatever the dump size: decompressed bytes are read in chunks and cut into
`<page>` elements, each parsed on its own. A multistream dump (with its `-index.txt.bz2` beside it) is
split into byte ranges of whole bz2 streams, so one file can be counted by many workers.

Errors name the file and the offset: compressed offsets for bz2 problems, uncompressed offsets (and the
page title) for XML and UTF-8 problems. Dumps must be UTF-8, as Wikimedia writes them; a UTF-16 or
otherwise encoded file is refused by name rather than read as a dump without pages.

The `<siteinfo>` header gives the wiki's language and namespace names (`read_site`); every partition of
a file reads it from the start of the file, so a byte range counts like the whole.
"""

from __future__ import annotations

import bz2
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from wit_builder import storage
from wit_builder.errors import WitError

from .wikitext import ENGLISH, Site

CHUNK = 1 << 20
SITEINFO_LIMIT = 16 << 20  # the header is a few kB; stop looking for it after this many bytes
_TITLE = re.compile(rb"<title>(.*?)</title>", re.S)
_SITEINFO = re.compile(rb"<siteinfo>.*?</siteinfo>", re.S)
_XML_LANG = re.compile(rb"<mediawiki\b[^>]*?\sxml:lang=[\"']([A-Za-z0-9-]+)")
_DBNAME = re.compile(r"([a-z_]+?)wiki$")
_XML_DECL = re.compile(rb"(?:\xef\xbb\xbf)?<\?xml[^>]*?\sencoding=[\"']([A-Za-z0-9._:-]+)")


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


def index_path(dump: str) -> str | None:
    """Wikipedia names the index of `X-multistream.xml.bz2` as `X-multistream-index.txt.bz2`."""
    name = Path(dump).name
    if not name.endswith(".xml.bz2"):
        return None
    candidate = storage.sibling(dump, name[: -len(".xml.bz2")] + "-index.txt.bz2")
    return candidate if storage.is_file(candidate) else None


def plan_parts(dump: str, partition_bytes: int) -> list[DumpPart]:
    """Partitions of one dump: byte ranges when a multistream index is beside it, else the file."""
    if not storage.is_file(dump):
        raise WitError("dump file not found", where=dump)
    size = storage.size(dump)
    if size == 0:
        raise WitError("empty dump: the file has no bytes", where=dump)
    index = index_path(dump)
    if index is None:
        return [DumpPart(dump)]
    offsets = sorted(set(_read_index_offsets(index)))
    if not offsets or offsets[-1] >= size:
        raise WitError(f"index does not match the dump ({len(offsets)} offsets, dump {size} bytes)",
                       where=str(index))
    # The first range starts at offset 0, so it holds the <siteinfo> header, and always its first page
    # stream too: a range of the header alone would be a part without pages.
    starts = [0] + [o for o in offsets if o > offsets[0]]
    parts, begin = [], 0
    for s in starts[1:]:
        if s - begin >= partition_bytes:
            parts.append(DumpPart(dump, begin, s))
            begin = s
    parts.append(DumpPart(dump, begin, size))
    return parts


def _read_index_offsets(index: str) -> Iterator[int]:
    try:
        with storage.open_input(index) as raw, bz2.open(raw, "rt", encoding="utf-8") as f:
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
    with storage.open_input(path) as raw:
        head = raw.read(3)
        raw.seek(0)
        if head != b"BZh":
            if path.endswith(".bz2"):
                raise WitError("not a bz2 file (no 'BZh' header)", where=path, record="byte 0")
            while chunk := raw.read(CHUNK):
                yield chunk
            return
        raw.seek(part.start)
        end = part.end if part.end is not None else storage.size(path)
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


def check_encoding(head: bytes, where: str) -> None:
    """Refuse a dump that is not UTF-8, from its first bytes (byte-order mark, zero bytes around the
    first `<`, or the encoding its XML declaration names)."""
    if head[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        encoding = "UTF-32"
    elif head[:2] in (b"\xff\xfe", b"\xfe\xff", b"<\x00", b"\x00<"):
        encoding = "UTF-16"
    else:
        m = _XML_DECL.match(head)
        declared = m.group(1).decode("ascii") if m else "utf-8"
        if declared.lower().replace("_", "-") in ("utf-8", "utf8", "us-ascii", "ascii"):
            return
        encoding = declared
    raise WitError(f"the dump is encoded as {encoding}; only UTF-8 dumps can be read (convert it first, "
                   f"e.g. `iconv -f {encoding} -t UTF-8`)", where=where, record="uncompressed byte 0")


def read_site(path: str) -> Site:
    """The wiki's language and namespaces, from the `<siteinfo>` at the start of the dump file.

    Namespace names come from `<namespaces>` (`<namespace key="14">Категория</namespace>`; a key listed
    twice gives an alias) and, where present, from `<namespacealiases>` (`<ns id="6">Картинка</ns>`, the
    API's form). A dump without them falls back to the canonical English names (see `Site`).
    """
    head = bytearray()
    with closing(_chunks(DumpPart(path))) as chunks:
        for chunk in chunks:
            if not head:
                check_encoding(chunk, path)
            head += chunk
            if b"</siteinfo>" in head or b"<page>" in head or len(head) >= SITEINFO_LIMIT:
                break
    return parse_site(bytes(head), path)


def parse_site(head: bytes, where: str = "") -> Site:
    """The `Site` of a dump from its first bytes: the language from `<mediawiki xml:lang>` (else the
    `<dbname>`), the namespaces from `<siteinfo>`."""
    m = _XML_LANG.search(head, 0, head.find(b"<siteinfo>") if b"<siteinfo>" in head else 4096)
    lang = m.group(1).decode("ascii") if m else ""
    info = _SITEINFO.search(head)
    if info is None or head.find(b"<page>", 0, info.start()) >= 0:
        return Site(lang or "en")
    try:
        el = ET.fromstring(info.group(0))
    except ET.ParseError as e:
        raise WitError(f"malformed <siteinfo>: {e}", where=where,
                       record=f"uncompressed byte {info.start()}") from None
    if not lang:
        db = _DBNAME.match(el.findtext("dbname") or "")
        lang = db.group(1).replace("_", "-") if db else "en"
    names: dict[str, int] = {}
    for ns in [*el.iterfind("namespaces/namespace"), *el.iterfind("namespacealiases/*")]:
        key = ns.get("key", ns.get("id"))
        if key is not None and key.lstrip("-").isdigit() and (ns.text or "").strip():
            names[ns.text.strip()] = int(key)
    return Site(lang, names)


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
    first = part.start == 0
    for chunk in _chunks(part):
        if first:
            check_encoding(chunk, part.path)
            first = False
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


def parse_page(offset: int, data: bytes, site: Site | None = None) -> Page:
    """One `<page>` element. Without an `<ns>` tag (older dumps) the namespace is read from the title's
    prefix, with the site's namespace names."""
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
    title = el.findtext("title") or ""
    ns = el.findtext("ns")
    return Page(
        offset=offset,
        title=title,
        ns=int(ns) if ns and ns.strip() else (site or ENGLISH).namespace_of(title),
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
