"""The egress proxy: every download goes through it, so the safety policy holds where it cannot be
bypassed, at connect time, on every redirect hop.

img2dataset fetches with urllib, which sends every http request (and every https CONNECT) to the proxy
named in `http_proxy`/`https_proxy`; the download stage sets those (and clears `no_proxy`) in the
process that runs img2dataset, and refuses every other scheme before img2dataset sees it. urllib follows
redirects itself, so each hop is a new request through here. For each request the proxy:

- resolves the host and refuses it if any address is loopback, private, link-local, multicast,
  reserved or unspecified (IPv4-mapped IPv6 is unwrapped; decimal, hex and octal IPv4 literals are
  resolved by the C library like any name, then checked), and then connects to the checked address
  itself, so a second DNS answer cannot differ (no rebinding). Networks the recipe lists in
  `allow_networks` (a NAS or an object store inside 10/8, say) are let through, except that a
  link-local address needs a listed network inside link-local space, and a cloud metadata address
  needs itself listed; loopback stays `allow_loopback`'s alone, and unspecified and multicast are
  never fetched;
- enforces a total deadline per request (not per socket read) and a cap on response bytes;
- limits concurrency and rate per host, and backs off a host that answers 429 or 503;
- refuses a redirect to any scheme but http(s) (`file:`, `gopher:`, `data:`, `ftp:`) as `bad_scheme`.
  urllib refuses most of those itself, and the download stage records its refusal the same way (that
  is what holds behind an https tunnel, where the proxy cannot read the Location).
- rewrites a redirect's Location whose host is in Unicode or in percent-encoded UTF-8 to the URL as
  `normalise_url` writes it (the host in IDNA, the path percent-encoded): urllib would send the host's
  bytes percent-encoded, a name no resolver knows. The next hop then comes through here like any other.

A refusal is an HTTP 403 whose reason phrase says why (`wit-refused private_address`), which
img2dataset records as the sample's error. A `route` sends every host name to one address instead of
DNS: that is how the tests and the demo reach the miniature web on 127.0.0.1 with the pages' original
URLs, while the address checks still apply (the demo's policy allows loopback; IP literals are never
routed).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import select
import socket
import socketserver
import string
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httptools

from ..urls import normalise_url

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
              "te", "trailer", "transfer-encoding", "upgrade"}
# A relayed body keeps its framing, so its Transfer-Encoding goes with it.
RESPONSE_HOP_BY_HOP = HOP_BY_HOP - {"transfer-encoding"}
# What a host may not contain once its percent-escapes are decoded (WHATWG's forbidden host code points).
FORBIDDEN_HOST = frozenset(" #%/:<>?@[\\]^|")


METADATA_ADDRESSES = frozenset(map(ipaddress.ip_address, ("169.254.169.254", "fd00:ec2::254")))
LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))


@dataclass(frozen=True)
class Policy:
    allow_loopback: bool = False
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    deadline_s: float = 20.0
    max_bytes: int = 20 << 20
    per_host_connections: int = 8
    per_host_rps: float = 0.0  # 0: no rate limit
    route: tuple[str, int] | None = None  # send every host name here instead of DNS


class Refused(Exception):
    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def listed(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, networks) -> bool:
    """Whether one of the recipe's allowed networks lets this address through."""
    for net in networks:
        if addr.version != net.version or addr not in net:
            continue
        if addr in METADATA_ADDRESSES:
            if net.num_addresses == 1:
                return True
        elif not addr.is_link_local or any(net.version == ll.version and net.subnet_of(ll) for ll in LINK_LOCAL):
            return True
    return False


@functools.lru_cache(maxsize=65536)
def address_problem(ip: str, allow_loopback: bool, allow_networks=()) -> str | None:
    """Why an address may not be fetched, or None (remembered: a crawl asks about the same addresses
    again and again)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return None if allow_loopback else "loopback_address"
    if addr.is_unspecified:
        return "unspecified_address"
    if addr.is_multicast:
        return "multicast_address"
    if allow_networks and listed(addr, allow_networks):
        return None
    if addr.is_link_local:
        return "link_local_address"
    if addr.is_reserved:
        return "reserved_address"
    if addr.is_private:
        return "private_address"
    if not addr.is_global:
        return "reserved_address"
    return None


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:  # the legacy forms the C library accepts: 2130706433, 0x7f000001, 0177.1, 127.1
        socket.inet_aton(host)
        return True
    except OSError:
        return False


def resolve(host: str, port: int, policy: Policy) -> tuple[str, int]:
    """The checked address to connect to, or Refused."""
    if policy.route is not None and not _is_ip_literal(host):
        addresses = [policy.route]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise Refused("dns_failure") from None
        addresses = [(info[4][0], port) for info in infos]
    for ip, _ in addresses:
        problem = address_problem(ip, policy.allow_loopback, policy.allow_networks)
        if problem:
            raise Refused(problem)
    return addresses[0]


def _bad_redirect(location: str | None) -> bool:
    """Whether a redirect leads to a scheme other than http(s): `file:`, `gopher:`, `data:`, `ftp:`..."""
    if not location:
        return False
    try:
        scheme = urlsplit(location.strip()).scheme.lower()
    except ValueError:
        return False  # malformed: the client fails it on its own
    return scheme not in ("", "http", "https")


def relayed_location(location: str, base: str) -> str:
    """The Location to relay for a redirect from `base`: as it came, unless its host is in Unicode or
    percent-encoded UTF-8, then normalised (`http://b%C3%BCcher.example/a b` ->
    `http://xn--bcher-kva.example/a%20b`), so that the client asks for a host that resolves, and the
    next hop is checked for where it really goes. Refused if it has no such form."""
    try:  # header values arrive as latin-1 characters: these are its bytes, as UTF-8 if they are
        text = location.encode("latin-1").decode("utf-8").strip()
    except UnicodeDecodeError:  # other bytes: percent-encoded as they are, as urllib does
        text = quote(location.strip(), safe=string.punctuation, encoding="latin-1")
    try:
        parts = urlsplit(text)
    except ValueError:
        return location  # malformed: the client fails it on its own
    userinfo, at, hostport = parts.netloc.rpartition("@")
    escaped = "%" in hostport and not hostport.startswith("[")  # an IPv6 zone is %25-escaped
    if text.isascii() and not escaped:
        return location
    if escaped:
        host, colon, port = hostport.partition(":")
        try:
            host = unquote(host, errors="strict")
        except UnicodeDecodeError:
            raise Refused("bad_host") from None
        if not host or not host.isprintable() or FORBIDDEN_HOST.intersection(host):
            raise Refused("bad_host")
        text = urlunsplit(parts._replace(netloc=userinfo + at + host + colon + port))
    url, reason = normalise_url(text, base)
    if url is None:
        raise Refused(reason)
    return url


class HostGate:
    """Per-host concurrency, rate and backoff."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.lock = threading.Lock()
        self.slots: dict[str, threading.BoundedSemaphore] = {}
        self.next_start: dict[str, float] = {}

    def enter(self, host: str, deadline: float) -> threading.BoundedSemaphore:
        with self.lock:
            sem = self.slots.get(host)
            if sem is None:
                sem = self.slots[host] = threading.BoundedSemaphore(self.policy.per_host_connections)
        if not sem.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Refused("host_busy")
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start.get(host, 0.0))
            if self.policy.per_host_rps > 0:
                self.next_start[host] = start + 1.0 / self.policy.per_host_rps
        if start > now:
            if start > deadline:
                sem.release()
                raise Refused("host_rate_limited")
            time.sleep(start - now)
        return sem

    def back_off(self, host: str, retry_after: str | None) -> None:
        try:
            delay = min(float(retry_after), 60.0) if retry_after else 5.0
        except ValueError:
            delay = 5.0
        with self.lock:
            self.next_start[host] = max(self.next_start.get(host, 0.0), time.monotonic() + delay)


class _Head:
    """One HTTP request or response head, as httptools (llhttp, in C) parses it."""

    def __init__(self, data: bytes, response: bool):
        self.target, self.reason, self.headers = b"", b"", []
        parser = (httptools.HttpResponseParser if response else httptools.HttpRequestParser)(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # CONNECT: what follows is the tunnel's
            pass
        self.version = parser.get_http_version() or "1.0"
        self.status = parser.get_status_code() if response else 0
        self.method = b"" if response else parser.get_method()

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


def read_head(sock: socket.socket, deadline: float, limit: int = 65536) -> tuple[bytes, bytes]:
    """An HTTP head up to its blank line, and the bytes already received after it."""
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline")
        if len(data) > limit:
            raise ConnectionError(f"head over {limit} bytes")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the end of the head")
        data += chunk
    return data[:end + 4], data[end + 4:]


def head_bytes(first_line: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [first_line, *(f"{k}: {v}" for k, v in headers), "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


class _Connection(socketserver.BaseRequestHandler):
    """One client connection, one request: the answer closes it. Bodies are relayed as they come
    (chunked ones too, with their Transfer-Encoding), so only the heads are parsed."""

    def handle(self) -> None:
        policy: Policy = self.server.policy
        deadline = time.monotonic() + policy.deadline_s
        try:
            head, self.early = read_head(self.request, deadline)
            request = _Head(head, response=False)
        except (OSError, httptools.HttpParserError):
            return
        if request.method == b"CONNECT":
            return self._tunnel(request.target.decode("latin-1"), deadline, policy)
        if request.method not in (b"GET", b"HEAD"):
            return self._answer(501, "Unsupported method", "method_not_allowed")
        parts = urlsplit(request.target.decode("latin-1"))
        if parts.scheme != "http" or not parts.hostname:
            return self._refuse("bad_scheme")
        host, port = parts.hostname, parts.port or 80
        try:
            ip, port = resolve(host, port, policy)
            gate = self.server.gate.enter(host, deadline)
        except Refused as e:
            return self._refuse(e.reason)
        try:
            self._forward(request, parts, host, ip, port, deadline, policy)
        finally:
            gate.release()

    def _answer(self, status: int, reason: str, why: str) -> None:
        body = f"refused by wit egress policy: {why}\n".encode()
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        with contextlib.suppress(OSError):
            self.request.sendall(head_bytes(f"HTTP/1.0 {status} {reason}", headers) + body)

    def _refuse(self, reason: str) -> None:
        self.server.stats[reason] = self.server.stats.get(reason, 0) + 1
        self.server.answered(reason)
        self._answer(403, f"wit-refused {reason}", reason)

    def _forward(self, request: _Head, parts, host, ip, port, deadline, policy) -> None:
        try:
            upstream = socket.create_connection((ip, port), timeout=max(0.1, deadline - time.monotonic()))
        except OSError:
            return self._refuse("connect_failed")
        with upstream:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            headers = [("Host", parts.netloc), *((k, v) for k, v in request.headers
                                                  if k.lower() not in HOP_BY_HOP and k.lower() != "host")]
            version = "HTTP/1.0" if request.version == "1.0" else "HTTP/1.1"
            try:
                upstream.sendall(head_bytes(f"{request.method.decode()} {path} {version}", headers))
                head, body = read_head(upstream, deadline)
                response = _Head(head, response=True)
            except TimeoutError:
                return self._refuse("deadline")
            except (OSError, httptools.HttpParserError):
                return self._refuse("upstream_error" if time.monotonic() < deadline else "deadline")
            status = response.status
            kept = [(k, v) for k, v in response.headers if k.lower() not in RESPONSE_HOP_BY_HOP]
            if 300 <= status < 400:
                if _bad_redirect(response.get("location")):
                    return self._refuse("bad_scheme")
                try:
                    base = request.target.decode("latin-1")
                    kept = [(k, relayed_location(v, base) if k.lower() == "location" else v) for k, v in kept]
                except Refused as e:
                    return self._refuse(e.reason)
            if status in (429, 503):
                self.server.gate.back_off(host, response.get("retry-after"))
            length = response.get("content-length")
            if length and length.strip().isdigit() and int(length) > policy.max_bytes:
                return self._refuse("too_large")
            if not 300 <= status < 400:  # a redirect is not an answer yet: the next hop is
                self.server.answered("ok" if status < 300 else f"http_{status}")
            first = f"HTTP/{response.version} {status} {response.reason.decode('latin-1')}"
            with contextlib.suppress(OSError):
                self._relay_body(upstream, head_bytes(first, kept), body, deadline, policy.max_bytes)

    def _relay_body(self, upstream, head: bytes, data: bytes, deadline: float, max_bytes: int) -> None:
        """The response head and then its body as received (its first bytes in the head's packet),
        until the server closes, the deadline or the byte cap."""
        sent = len(data)
        self.request.sendall(head + data if sent <= max_bytes else head)
        while sent <= max_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.server.stats["deadline"] = self.server.stats.get("deadline", 0) + 1
                return  # the client sees a short body and fails the sample
            upstream.settimeout(remaining)
            data = upstream.recv(65536)
            if not data:
                return
            sent += len(data)
            if sent <= max_bytes:
                self.request.sendall(data)
        self.server.stats["too_large"] = self.server.stats.get("too_large", 0) + 1

    def _tunnel(self, target: str, deadline: float, policy: Policy) -> None:
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        try:
            if not port.isdigit() or int(port) != 443:
                raise Refused("bad_port")
            if policy.route is not None and not _is_ip_literal(host):
                raise Refused("https_not_replayed")
            ip, port = resolve(host, int(port), policy)
            gate = self.server.gate.enter(host, deadline)
        except Refused as e:
            return self._refuse(e.reason)
        try:
            upstream = socket.create_connection((ip, port), timeout=max(0.1, deadline - time.monotonic()))
        except OSError:
            gate.release()
            return self._refuse("connect_failed")
        try:
            self.request.sendall(b"HTTP/1.0 200 Connection established\r\n\r\n")
            self.server.answered("https")  # what comes back through the tunnel is not ours to read
            if self.early:
                upstream.sendall(self.early)
            self._relay(self.request, upstream, deadline, policy.max_bytes)
        except OSError:
            pass
        finally:
            upstream.close()
            gate.release()

    @staticmethod
    def _relay(client, upstream, deadline, max_bytes) -> None:
        received = 0
        while time.monotonic() < deadline:
            ready, _, _ = select.select([client, upstream], [], [], max(0.0, deadline - time.monotonic()))
            for src in ready:
                data = src.recv(65536)
                if not data:
                    return
                if src is upstream:
                    received += len(data)
                    if received > max_bytes:
                        return
                (upstream if src is client else client).sendall(data)


class _PooledServer(socketserver.TCPServer):
    """Each connection on a pool of reused threads, each of which accepts its own next connection:
    a thread per connection cost about a quarter of the proxy's CPU (bench/download.py at 64
    threads), and handing each accepted connection from a serving thread to a pool thread cost
    another context switch per request. The pool grows while every thread is busy, up to `threads`;
    beyond, connections wait in the listening queue (a handler's deadline starts when it runs). Daemon
    threads: a handler still waiting out its deadline on a server that never answers must not hold
    up the process's exit."""

    request_queue_size = 1024  # img2dataset's threads connect all at once; a full queue drops SYNs

    def __init__(self, address, handler, threads: int = 256):
        super().__init__(address, handler)
        self.limit, self.started, self.idle = threads, 0, 0
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock:
            self._add_thread()

    def _add_thread(self) -> None:  # with the lock held
        self.started += 1
        self.idle += 1
        threading.Thread(target=self._serve, name="egress", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                request, client_address = self.socket.accept()
            except OSError:  # the listening socket was shut down: the proxy is closing
                return
            with self.lock:
                self.idle -= 1
                if self.idle == 0 and self.started < self.limit:
                    self._add_thread()
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
            with self.lock:
                self.idle += 1

    def stop(self) -> None:
        """Wake every thread blocked in accept (shutting a listening socket down does, on Linux)."""
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.server_close()


class EgressProxy:
    """A running proxy on 127.0.0.1; use as a context manager."""

    def __init__(self, policy: Policy):
        self.server = _PooledServer(("127.0.0.1", 0), _Connection)
        self.server.policy = policy
        self.server.gate = HostGate(policy)
        self.server.stats = {}
        self.answers: dict[str, int] = {}  # final answers by outcome: "ok", "http_404", a refusal...
        lock = threading.Lock()

        def answered(outcome: str) -> None:
            with lock:
                self.answers[outcome] = self.answers.get(outcome, 0) + 1

        self.server.answered = answered

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def stats(self) -> dict:
        return dict(self.server.stats)

    def __enter__(self) -> EgressProxy:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()
