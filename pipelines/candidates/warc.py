"""WARC and Common Crawl WAT readers, tolerant of truncated gzip members and bad records."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from wit_builder import storage

from ..urls import normalise_url
from .collector import Collector
from .html import html_images

log = logging.getLogger("wit")

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
