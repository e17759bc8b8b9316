"""The miniature web: real pages and images replayed from WARC captures over HTTP on 127.0.0.1, plus
routes that misbehave the ways the open web does. Tests and `make demo` download from it.

Requests arrive as the egress proxy forwards them (origin-form path, original Host header), so each
capture is served under its original URL; an international host name is served under its IDNA form
(`bücher.example` as `xn--bcher-kva.example`), whichever form the capture recorded. The fault routes
live on the host `faults.wit.test` (the `.test` domain is reserved and never resolves on the real web);
the international host `bücher.wit.test` is where some of them redirect.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit

from ..urls import idna_host, normalise_url

FAULT_HOST = "faults.wit.test"
ROBOTS_DOWN_HOST = "robots-down.wit.test"  # a site whose robots.txt answers 503
# An international host with one image, served only under the URL a client sends for it: the host in
# IDNA, the path percent-encoded as UTF-8 (`http://xn--bcher-kva.wit.test/umschl%C3%A4ge/titel.jpg`).
IDN_HOST, IDN_PATH = "bücher.wit.test", "/umschläge/titel.jpg"
IDN_URL = normalise_url(f"http://{IDN_HOST}{IDN_PATH}")[0]
# Each fault route and what a downloader must make of it.
FAULT_ROUTES = {
    "/404.jpg": "HTTP 404",
    "/500.jpg": "HTTP 500",
    "/hang.jpg": "sends nothing until the client gives up",
    "/trickle.jpg": "one byte every half second",
    "/truncated.jpg": "a body shorter than its Content-Length",
    "/html.jpg": "HTML served as image/jpeg",
    "/corrupt.jpg": "a JPEG header followed by noise",
    "/huge.png": "a valid 20000x20000 PNG (a decompression bomb)",
    "/noai.jpg": "a real image with X-Robots-Tag: noai",
    "/redirect/3.jpg": "a chain of three redirects to a real image",
    "/redirect-private.jpg": "a redirect to a private address",
    "/redirect-metadata.jpg": "a redirect to the link-local metadata address",
    "/redirect-file.jpg": "a redirect to file:///etc/passwd",
    "/redirect-gopher.jpg": "a redirect to a gopher: URL",
    "/redirect-data.jpg": "a redirect to a data: URI (a real GIF)",
    "/to/<status>/<form>/<target>.jpg": "a redirect (301, 302, 303, 307 or 308) to a forbidden address,"
                                        " its Location absolute, scheme-relative or with a leading space",
    "/to-idn/<form>.jpg": f"a redirect to the image on {IDN_HOST}, its Location's host in UTF-8 or"
                          " percent-encoded UTF-8, or its path in UTF-8",
    "/robots.txt": "disallows /robots-disallowed/ for every user agent",
    "/robots-disallowed/<name>.jpg": "a real image that robots.txt disallows",
    "/slow.jpg": "a real image after a one-second delay",
    "/slow/<name>.jpg": "the same, under any name",
    "/429.jpg": "HTTP 429 with Retry-After",
    "/ok/<name>.jpg": "the same real image under any name (exact duplicates)",
    "/variant/<quality>.jpg": "that image re-encoded at another JPEG quality (near duplicates)",
    "/fashion/<i>.jpg": "Fashion-MNIST test image i, enlarged (evaluation-set overlap)",
}
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
BAD_SCHEME_REDIRECTS = {
    "/redirect-file.jpg": "file:///etc/passwd",
    "/redirect-gopher.jpg": f"gopher://{FAULT_HOST}:70/1/x.jpg",
    "/redirect-data.jpg": "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7",
}

# Forbidden hosts a redirect can point at, by name, and the forms of its Location header.
REDIRECT_TARGETS = {"private": "10.0.0.1", "private-192": "192.168.0.1", "shared": "100.64.0.1",
                    "metadata": "169.254.169.254", "ula": "[fd00::1]", "multicast": "224.0.0.1",
                    "unspecified": "0", "ipv4-compatible": "[::127.0.0.1]"}
REDIRECT_FORMS = {"absolute": "http://{}/x.jpg", "scheme-relative": "//{}/x.jpg", "leading-space": " http://{}/x.jpg"}
# The Locations of a redirect to the international host's image, sent as UTF-8 bytes, as servers do.
IDN_REDIRECTS = {"utf-8": f"http://{IDN_HOST}{IDN_PATH}", "scheme-relative": f"//{IDN_HOST}{IDN_PATH}",
                 "percent-encoded": f"http://{quote(IDN_HOST)}{quote(IDN_PATH)}",
                 "unicode-path": f"http://{idna_host(IDN_HOST)}{IDN_PATH}"}


def _strip(headers) -> list[tuple[str, str]]:
    drop = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}
    return [(k, v) for k, v in headers if k.lower() not in drop]


def load_captures(warcs: list[str]) -> dict[tuple[str, str], tuple[int, list, bytes]]:
    """(host, path?query) -> (status, headers, body) for every HTTP response in the WARCs."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    from wit_builder import storage

    captures = {}
    for warc in warcs:
        with storage.open_input(warc) as f:
            try:
                for record in ArchiveIterator(f, record_types=WarcRecordType.response):
                    uri = (record.headers.get("WARC-Target-URI") or "").strip("<> ")
                    parts = urlsplit(uri)
                    if parts.scheme != "http" or not parts.hostname or record.http_headers is None:
                        continue
                    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                    # Served under the host's IDNA form: the Host header a client sends for it.
                    key = (idna_host(parts.hostname) or parts.hostname.lower(), target)
                    if key not in captures:
                        captures[key] = (record.http_headers.status_code,
                                         _strip(record.http_headers.items()), record.reader.read())
            except OSError:
                pass  # a broken tail: serve what came before it
    return captures


@lru_cache(maxsize=1)
def huge_png(side: int = 20000) -> bytes:
    """A valid grey PNG of side x side pixels, about 400 KB compressed, 400 MB decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def reencoded(jpeg: bytes, quality: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


@lru_cache(maxsize=64)
def fashion_image(index: int) -> bytes | None:
    """A Fashion-MNIST test image, enlarged four times, as JPEG (None without the dataset)."""
    import gzip

    import numpy as np
    from PIL import Image

    path = Path(FASHION_MNIST) / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        return None
    pixels = np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28)
    out = io.BytesIO()
    Image.fromarray(pixels[index]).resize((112, 112), Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, headers: list, body: bytes, length: int | None = None) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        web: MiniWeb = self.server.web
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        path = self.path
        if path.startswith("http://"):  # asked directly as a proxy
            parts = urlsplit(path)
            host, path = (parts.hostname or "").lower(), (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        web.requests += 1
        try:
            if host == FAULT_HOST or host.replace(".", "").isdigit():  # or asked by IP, directly
                return self._fault(path, web)
            if host == ROBOTS_DOWN_HOST:  # robots.txt fails with 503: the whole site is off limits
                if path == "/robots.txt":
                    # Retry-After: 1, so that the proxy's backoff (5 s without one) does not outlast
                    # a client's timeout when a test asks again.
                    return self._send(503, [("Content-Type", "text/plain"), ("Retry-After", "1")], b"try later\n")
                return self._send(200, [("Content-Type", "image/jpeg")], web.sample_image)
            if host == urlsplit(IDN_URL).hostname:
                if path == urlsplit(IDN_URL).path:
                    return self._send(200, [("Content-Type", "image/jpeg")], web.sample_image)
                return self._send(404, [("Content-Type", "text/plain")], b"not the URL a client sends\n")
            capture = web.captures.get((host, path))
            if capture is None:
                return self._send(404, [("Content-Type", "text/plain")], b"not in the capture\n")
            self._send(*capture)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _fault(self, path: str, web: MiniWeb) -> None:
        jpeg = web.sample_image
        image = [("Content-Type", "image/jpeg")]
        if path == "/404.jpg":
            return self._send(404, [("Content-Type", "text/html")], b"<h1>Not Found</h1>")
        if path == "/500.jpg":
            return self._send(500, [("Content-Type", "text/html")], b"<h1>Server Error</h1>")
        if path == "/429.jpg":
            return self._send(429, [("Retry-After", "1")], b"slow down")
        if path == "/hang.jpg":
            web.stop.wait(web.hang_seconds)
            return None
        if path == "/trickle.jpg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(jpeg)))
            self.end_headers()
            for i in range(len(jpeg)):
                if web.stop.wait(0.5):
                    return None
                self.wfile.write(jpeg[i : i + 1])
                self.wfile.flush()
            return None
        if path == "/truncated.jpg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(jpeg)))
            self.end_headers()
            self.wfile.write(jpeg[: len(jpeg) // 3])
            return None
        if path == "/html.jpg":
            return self._send(200, image, b"<html><body>Not an image</body></html>" * 20)
        if path == "/corrupt.jpg":
            return self._send(200, image, b"\xff\xd8\xff\xe0" + os.urandom(4000))
        if path == "/huge.png":
            return self._send(200, [("Content-Type", "image/png")], huge_png())
        if path == "/noai.jpg":
            return self._send(200, image + [("X-Robots-Tag", "noai")], jpeg)
        if path.startswith("/redirect/"):
            n = int(path.split("/")[2].split(".")[0] or 0)
            if n <= 0:
                return self._send(200, image, jpeg)
            return self._send(302, [("Location", f"http://{FAULT_HOST}/redirect/{n - 1}.jpg")], b"")
        if path == "/redirect-private.jpg":
            return self._send(302, [("Location", "http://10.0.0.1/secret.jpg")], b"")
        if path == "/redirect-metadata.jpg":
            return self._send(302, [("Location", "http://169.254.169.254/latest/meta-data/")], b"")
        if path.startswith("/to/") and path.count("/") == 4:
            _, _, status, form, target = path.split("/")
            target = target.removesuffix(".jpg")
            if status in ("301", "302", "303", "307", "308") and form in REDIRECT_FORMS and target in REDIRECT_TARGETS:
                location = REDIRECT_FORMS[form].format(REDIRECT_TARGETS[target])
                return self._send(int(status), [("Location", location)], b"")
        if path.startswith("/to-idn/") and (form := path[len("/to-idn/"):].removesuffix(".jpg")) in IDN_REDIRECTS:
            # Header values go out as latin-1: these are the Location's UTF-8 bytes.
            location = IDN_REDIRECTS[form].encode("utf-8").decode("latin-1")
            return self._send(302, [("Location", location)], b"")
        if path in BAD_SCHEME_REDIRECTS:
            return self._send(302, [("Location", BAD_SCHEME_REDIRECTS[path])], b"")
        if path == "/slow.jpg" or path.startswith("/slow/"):
            web.stop.wait(1.0)
            return self._send(200, image, jpeg)
        if path == "/robots.txt":
            return self._send(200, [("Content-Type", "text/plain")], b"User-agent: *\nDisallow: /robots-disallowed/\n")
        if path.startswith("/ok/") or path.startswith("/robots-disallowed/"):  # a real image under any name
            return self._send(200, image, jpeg)
        if path.startswith("/variant/"):
            return self._send(200, image, reencoded(jpeg, int(path.split("/")[2].split(".")[0])))
        if path.startswith("/fashion/"):
            data = fashion_image(int(path.split("/")[2].split(".")[0]))
            return self._send(200, image, data) if data else self._send(404, [], b"no Fashion-MNIST")
        return self._send(404, [("Content-Type", "text/plain")], b"no such fault\n")


class _Server(ThreadingHTTPServer):
    # A client's threads connect all at once (img2dataset's 64 at a time): with socketserver's
    # listening queue of 5, the overflow's connections wait a second for the kernel to retry them.
    request_queue_size = 1024


class MiniWeb:
    """Use as a context manager: `with MiniWeb([warc]) as web: web.address`."""

    def __init__(self, warcs: list[str], hang_seconds: float = 60.0):
        self.captures = load_captures([str(w) for w in warcs])
        self.sample_image = next((body for (_, _, body) in self.captures.values()
                                  if body[:3] == b"\xff\xd8\xff" and len(body) > 2000), b"")
        self.hang_seconds = hang_seconds
        self.requests = 0
        self.stop = threading.Event()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.web = self
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def __enter__(self) -> MiniWeb:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
