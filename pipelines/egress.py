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

A refusal is an HTTP 403 whose reason phrase says why (`wit-refused private_address`), which
img2dataset records as the sample's error. A `route` sends every host name to one address instead of
DNS: that is how the tests and the demo reach the miniature web on 127.0.0.1 with the pages' original
URLs, while the address checks still apply (the demo's policy allows loopback; IP literals are never
routed).
"""

from __future__ import annotations

import http.client
import ipaddress
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
              "te", "trailer", "transfer-encoding", "upgrade"}


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


def address_problem(ip: str, allow_loopback: bool, allow_networks=()) -> str | None:
    """Why an address may not be fetched, or None."""
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


class HostGate:
    """Per-host concurrency, rate and backoff."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.lock = threading.Lock()
        self.slots: dict[str, threading.BoundedSemaphore] = {}
        self.next_start: dict[str, float] = {}

    def enter(self, host: str, deadline: float) -> threading.BoundedSemaphore:
        with self.lock:
            sem = self.slots.setdefault(host, threading.BoundedSemaphore(self.policy.per_host_connections))
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


class _Handler(BaseHTTPRequestHandler):
    server_version = "wit-egress"
    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:  # quiet: outcomes are recorded per sample
        pass

    def _refuse(self, reason: str) -> None:
        self.server.stats[reason] = self.server.stats.get(reason, 0) + 1
        self.server.answered(reason)
        body = f"refused by wit egress policy: {reason}\n".encode()
        try:
            self.send_response(403, f"wit-refused {reason}")
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    def _forward(self) -> None:
        policy: Policy = self.server.policy
        deadline = time.monotonic() + policy.deadline_s
        parts = urlsplit(self.path)
        if parts.scheme != "http" or not parts.hostname:
            return self._refuse("bad_scheme")
        host, port = parts.hostname, parts.port or 80
        try:
            ip, port = resolve(host, port, policy)
            gate = self.server.gate.enter(host, deadline)
        except Refused as e:
            return self._refuse(e.reason)
        try:
            self._fetch(host, ip, port, parts, deadline, policy)
        finally:
            gate.release()

    def _fetch(self, host, ip, port, parts, deadline, policy) -> None:
        try:
            sock = socket.create_connection((ip, port), timeout=max(0.1, deadline - time.monotonic()))
        except OSError:
            return self._refuse("connect_failed")
        conn = http.client.HTTPConnection(host, port)
        conn.sock = sock
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = parts.netloc
        headers["Connection"] = "close"
        try:
            conn.request(self.command, path, headers=headers)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException):
            conn.close()
            return self._refuse("upstream_error" if time.monotonic() < deadline else "deadline")
        try:
            if 300 <= resp.status < 400 and _bad_redirect(resp.getheader("Location")):
                return self._refuse("bad_scheme")
            if resp.status in (429, 503):
                self.server.gate.back_off(host, resp.getheader("Retry-After"))
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                return self._refuse("too_large")
            if not 300 <= resp.status < 400:  # a redirect is not an answer yet: the next hop is
                self.server.answered("ok" if resp.status < 300 else f"http_{resp.status}")
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            self.send_header("Connection", "close")
            self.end_headers()
            sent = 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.server.stats["deadline"] = self.server.stats.get("deadline", 0) + 1
                    break  # the client sees a short body and fails the sample
                sock.settimeout(remaining)
                chunk = resp.read1(65536)
                if not chunk:
                    break
                sent += len(chunk)
                if sent > policy.max_bytes:
                    self.server.stats["too_large"] = self.server.stats.get("too_large", 0) + 1
                    break
                self.wfile.write(chunk)
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
            self.close_connection = True

    def do_CONNECT(self) -> None:
        policy: Policy = self.server.policy
        deadline = time.monotonic() + policy.deadline_s
        host, _, port = self.path.rpartition(":")
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
            self.send_response(200, "Connection established")
            self.end_headers()
            self.server.answered("https")  # what comes back through the tunnel is not ours to read
            self._relay(self.connection, upstream, deadline, policy.max_bytes)
        finally:
            upstream.close()
            gate.release()
            self.close_connection = True

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


class _PooledServer(ThreadingHTTPServer):
    """Each connection on a pool of reused threads: starting a thread per connection cost about a
    quarter of the proxy's CPU (bench/download.py at 64 threads). The pool grows while every thread is
    busy, up to `threads`; beyond, connections wait their turn (a handler's deadline starts when it
    runs). Daemon threads, as ThreadingHTTPServer's: a handler still waiting out its deadline on a
    server that never answers must not hold up the process's exit (concurrent.futures' threads would)."""

    def __init__(self, address, handler, threads: int = 256):
        super().__init__(address, handler)
        self.limit, self.started, self.idle = threads, 0, 0
        self.lock = threading.Lock()
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()

    def process_request(self, request, client_address) -> None:
        with self.lock:
            if self.idle <= 0 and self.started < self.limit:
                self.started += 1
                threading.Thread(target=self._serve, name="egress", daemon=True).start()
            self.idle -= 1  # this connection claims an idle thread (or waits for one)
        self.waiting.put((request, client_address))

    def _serve(self) -> None:
        while True:
            with self.lock:
                self.idle += 1
            request, client_address = self.waiting.get()
            self.process_request_thread(request, client_address)


class EgressProxy:
    """A running proxy on 127.0.0.1; use as a context manager."""

    def __init__(self, policy: Policy):
        self.server = _PooledServer(("127.0.0.1", 0), _Handler)
        self.server.policy = policy
        self.server.gate = HostGate(policy)
        self.server.stats = {}
        self.answers: dict[str, int] = {}  # final answers by outcome: "ok", "http_404", a refusal...
        lock = threading.Lock()

        def answered(outcome: str) -> None:
            with lock:
                self.answers[outcome] = self.answers.get(outcome, 0) + 1

        self.server.answered = answered
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def stats(self) -> dict:
        return dict(self.server.stats)

    def __enter__(self) -> "EgressProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
