"""The egress proxy over real HTTP: the SSRF policy on every hop, deadlines, byte caps, host limits."""

import functools
import http.client
import http.server
import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import REPO

from pipelines.download.egress import EgressProxy, Policy, Refused, address_problem, relayed_location
from pipelines.download.miniweb import FAULT_HOST, IDN_REDIRECTS, IDN_URL, REDIRECT_FORMS, REDIRECT_TARGETS, MiniWeb

ARCHIVE = REPO / "data" / "warc" / "aut-example-2008.warc.gz"


@pytest.fixture(scope="module")
def web():
    with MiniWeb([ARCHIVE], hang_seconds=10) as w:
        yield w


def fetch(proxy: EgressProxy, url: str, timeout: float = 10) -> tuple[int, bytes] | str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url, "https": proxy.url, "ftp": proxy.url}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return f"{e.code} {e.reason}"
    except Exception as e:
        return repr(e)


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1:1/x.jpg", "loopback_address"),
    ("http://localhost/x.jpg", "loopback_address"),
    ("http://2130706433/x.jpg", "loopback_address"),       # decimal
    ("http://0x7f000001/x.jpg", "loopback_address"),       # hex
    ("http://0177.0.0.1/x.jpg", "loopback_address"),       # octal
    ("http://127.1/x.jpg", "loopback_address"),            # short form
    ("http://[::1]/x.jpg", "loopback_address"),
    ("http://[::ffff:127.0.0.1]/x.jpg", "loopback_address"),  # IPv4-mapped IPv6
    ("http://10.0.0.1/x.jpg", "private_address"),
    ("http://192.168.0.10/x.jpg", "private_address"),
    ("http://[::ffff:10.0.0.1]/x.jpg", "private_address"),
    ("http://169.254.169.254/latest/meta-data/", "link_local_address"),
    ("http://224.0.0.1/x.jpg", "multicast_address"),
    ("http://0.0.0.0/x.jpg", "unspecified_address"),
    ("http://0/x.jpg", "unspecified_address"),             # what the C library makes of "0"
    ("http://[::127.0.0.1]/x.jpg", "reserved_address"),    # IPv4-compatible IPv6 (deprecated)
    ("http://100.64.0.1/x.jpg", "reserved_address"),       # shared address space (carrier NAT)
    ("http://172.16.0.1/x.jpg", "private_address"),
    ("http://[fd00::1]/x.jpg", "private_address"),         # unique local IPv6
    ("http://[fe80::1]/x.jpg", "link_local_address"),
    ("http://[ff02::1]/x.jpg", "multicast_address"),
    ("http://240.0.0.1/x.jpg", "reserved_address"),
    ("http://no-such-host.invalid/x.jpg", "dns_failure"),
    ("ftp://example.com/x.jpg", "bad_scheme"),
])
def test_default_policy_refuses_with_a_reason(url, reason):
    with EgressProxy(Policy()) as proxy:
        assert fetch(proxy, url) == f"403 wit-refused {reason}"
        assert proxy.stats == {reason: 1}


def test_a_fully_qualified_localhost_is_refused():
    """`localhost.` (trailing dot) resolves to loopback where the resolver knows it, and fails where
    it does not: refused either way."""
    with EgressProxy(Policy()) as proxy:
        assert fetch(proxy, "http://localhost./x.jpg") in ("403 wit-refused loopback_address",
                                                           "403 wit-refused dns_failure")


def test_public_addresses_pass_the_check():
    assert address_problem("93.184.216.34", False) is None
    assert address_problem("2606:2800:220:1:248:1893:25c8:1946", False) is None


def test_replay_serves_original_urls_and_checks_every_redirect_hop(web):
    with EgressProxy(Policy(allow_loopback=True, route=web.address)) as proxy:
        status, body = fetch(proxy, "http://www.archive.org/images/logoc.jpg")
        assert status == 200 and body[:3] == b"\xff\xd8\xff"
        status, body = fetch(proxy, f"http://{FAULT_HOST}/redirect/3.jpg")  # 3 hops, each proxied
        assert status == 200 and body == web.sample_image
        assert fetch(proxy, f"http://{FAULT_HOST}/redirect-private.jpg") == "403 wit-refused private_address"
        assert fetch(proxy, f"http://{FAULT_HOST}/redirect-metadata.jpg") == "403 wit-refused link_local_address"
        assert "https_not_replayed" in fetch(proxy, "https://www.archive.org/x.jpg")


@pytest.mark.parametrize("target, reason", [
    ("private", "private_address"), ("private-192", "private_address"), ("shared", "reserved_address"),
    ("metadata", "link_local_address"), ("ula", "private_address"), ("multicast", "multicast_address"),
    ("unspecified", "unspecified_address"), ("ipv4-compatible", "reserved_address"),
])
def test_every_redirect_status_and_location_form_to_a_forbidden_address_is_refused(web, target, reason):
    """301, 302, 303, 307 and 308, with the Location absolute, scheme-relative (`//host/...`) or with a
    leading space: the next hop goes through the proxy and is refused for what it points at."""
    assert target in REDIRECT_TARGETS
    with EgressProxy(Policy(allow_loopback=True, route=web.address)) as proxy:
        for status in (301, 302, 303, 307, 308):
            for form in REDIRECT_FORMS:
                got = fetch(proxy, f"http://{FAULT_HOST}/to/{status}/{form}/{target}.jpg")
                assert got == f"403 wit-refused {reason}", (status, form, got)
        assert proxy.stats == {reason: 5 * len(REDIRECT_FORMS)}


@pytest.mark.parametrize("form", IDN_REDIRECTS)
def test_a_redirect_to_an_international_host_is_relayed_in_idna_and_followed(web, form):
    """A Location with its host in UTF-8 or percent-encoded UTF-8 (or its path in UTF-8) is relayed as
    normalise_url writes the URL, so the client asks for the real host, through the proxy."""
    with EgressProxy(Policy(allow_loopback=True, route=web.address)) as proxy:
        conn = http.client.HTTPConnection(*proxy.server.server_address, timeout=10)
        conn.request("GET", f"http://{FAULT_HOST}/to-idn/{form}.jpg")
        answer = conn.getresponse()
        assert (answer.status, answer.getheader("Location")) == (302, IDN_URL)
        conn.close()
        assert fetch(proxy, f"http://{FAULT_HOST}/to-idn/{form}.jpg") == (200, web.sample_image)
        assert proxy.answers == {"ok": 1} and proxy.stats == {}


@pytest.mark.parametrize("location, relayed", [
    ("http://b%C3%BCcher.example/a b", "http://xn--bcher-kva.example/a%20b"),
    ("http://B%C3%9CCHER.example:8080/x.jpg?q=1#top", "http://xn--bcher-kva.example:8080/x.jpg?q=1"),
    ("/b\xc3\xbccher/\xc3\xa4.jpg", "http://faults.wit.test/b%C3%BCcher/%C3%A4.jpg"),  # UTF-8 path, relative
    ("http://%31%30.0.0.1/x.jpg", "http://10.0.0.1/x.jpg"),  # then refused for where it goes, on the next hop
    ("http://example.com/x.jpg", "http://example.com/x.jpg"),  # ASCII: as it came
    (" http://10.0.0.1/x.jpg", " http://10.0.0.1/x.jpg"),
    ("/caf\xe9.jpg", "/caf\xe9.jpg"),  # not UTF-8 (latin-1): left for urllib, which sends its bytes
    ("http://[fe80::1%25eth0]/x.jpg", "http://[fe80::1%25eth0]/x.jpg"),  # an IPv6 zone is not a name
])
def test_relayed_location(location, relayed):
    assert relayed_location(location, f"http://{FAULT_HOST}/r.jpg") == relayed


@pytest.mark.parametrize("location", ["http://b%FCcher.example/x.jpg", "http://a%2Fb.example/x.jpg",
                                      "http://a%00b.example/", "http://" + "\xc3\xbc" * 70 + ".de/x.jpg"])
def test_a_location_host_with_no_idna_form_is_refused(location):
    with pytest.raises(Refused) as e:
        relayed_location(location, f"http://{FAULT_HOST}/r.jpg")
    assert e.value.reason == "bad_host"


def test_loopback_is_refused_unless_the_recipe_allows_it(web):
    url = f"http://127.0.0.1:{web.address[1]}/ok/a.jpg"
    with EgressProxy(Policy()) as proxy:
        assert fetch(proxy, url) == "403 wit-refused loopback_address"
    with EgressProxy(Policy(allow_loopback=True)) as proxy:
        assert fetch(proxy, url)[0] == 200


def test_total_deadline_cuts_hangs_and_trickles(web):
    with EgressProxy(Policy(allow_loopback=True, route=web.address, deadline_s=1.5)) as proxy:
        t = time.monotonic()
        assert fetch(proxy, f"http://{FAULT_HOST}/hang.jpg") == "403 wit-refused deadline"
        # The trickle sends a byte every 0.5 s: no single read times out, the whole request does.
        assert "IncompleteRead" in fetch(proxy, f"http://{FAULT_HOST}/trickle.jpg")
        assert time.monotonic() - t < 8


def test_byte_cap(web):
    with EgressProxy(Policy(allow_loopback=True, route=web.address, max_bytes=100_000)) as proxy:
        assert fetch(proxy, f"http://{FAULT_HOST}/huge.png") == "403 wit-refused too_large"
        assert proxy.stats["too_large"] == 1


def test_per_host_rate_limit_and_backoff_on_429(web):
    with EgressProxy(Policy(allow_loopback=True, route=web.address, per_host_rps=5)) as proxy:
        t = time.monotonic()
        for _ in range(6):
            assert fetch(proxy, f"http://{FAULT_HOST}/ok/x.jpg")[0] == 200
        assert time.monotonic() - t >= 1.0  # six starts at most five a second apart
    with EgressProxy(Policy(allow_loopback=True, route=web.address)) as proxy:
        assert fetch(proxy, f"http://{FAULT_HOST}/429.jpg") == "429 Too Many Requests"
        t = time.monotonic()
        assert fetch(proxy, f"http://{FAULT_HOST}/ok/x.jpg")[0] == 200  # same host: waits Retry-After
        assert time.monotonic() - t >= 0.9


NETS = {name: tuple(ipaddress.ip_network(n) for n in nets) for name, nets in {
    "ten": ["10.0.0.0/8"], "everything": ["0.0.0.0/0", "::/0"], "link_local": ["169.254.0.0/16"],
    "metadata": ["169.254.169.254/32"], "loopback": ["127.0.0.0/8"], "ula": ["fd00::/8"]}.items()}


@pytest.mark.parametrize("ip, networks, problem", [
    ("10.1.2.3", "ten", None),
    ("::ffff:10.1.2.3", "ten", None),                       # IPv4-mapped, unwrapped first
    ("192.168.0.10", "ten", "private_address"),             # not listed
    ("100.64.0.1", "everything", None),                     # shared address space, listed
    ("169.254.1.1", "everything", "link_local_address"),    # link-local needs a link-local network
    ("169.254.1.1", "link_local", None),
    ("169.254.169.254", "everything", "link_local_address"),  # metadata needs itself listed
    ("169.254.169.254", "link_local", "link_local_address"),
    ("169.254.169.254", "metadata", None),
    ("fd00:ec2::254", "ula", "private_address"),            # the IPv6 metadata address too
    ("fd00::2", "ula", None),
    ("127.0.0.1", "loopback", "loopback_address"),          # loopback is allow_loopback's alone
    ("0.0.0.0", "everything", "unspecified_address"),       # connecting to it reaches this machine
    ("224.0.0.1", "everything", "multicast_address"),
])
def test_allowed_networks_let_private_addresses_through_but_not_metadata_or_loopback(ip, networks, problem):
    assert address_problem(ip, False, NETS[networks]) == problem


def own_address() -> str | None:
    """This machine's address on its first non-loopback interface (the route a packet would take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ipaddress.ip_address(ip).is_loopback else ip


def test_a_server_on_a_private_network_is_reached_only_when_listed(tmp_path):
    """A real server on this machine's own non-loopback (private) address: refused by default,
    fetched once its network is listed in allow_networks."""
    ip = own_address()
    if ip is None or address_problem(ip, False) is None:
        pytest.skip("this machine has no private non-loopback address to serve on")
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 a picture")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer((ip, 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://{ip}:{server.server_address[1]}/a.jpg"
        with EgressProxy(Policy()) as proxy:
            assert fetch(proxy, url).startswith("403 wit-refused ")
        network = ipaddress.ip_network(f"{ip}/24", strict=False)
        with EgressProxy(Policy(allow_networks=(network,))) as proxy:
            assert fetch(proxy, url) == (200, b"\xff\xd8\xff\xe0 a picture")
        server.shutdown()


class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers the proxy relays as they come: a chunked body, and a head no HTTP parser accepts."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/chunked.jpg":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            for piece in (b"\xff\xd8\xff\xe0", b" in ", b"three chunks"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 9\r\n\r\nhello")
        self.close_connection = True


@pytest.mark.parametrize("path, answer", [
    ("/chunked.jpg", (200, b"\xff\xd8\xff\xe0 in three chunks")),  # framing relayed with the body
    ("/conflicting-lengths.jpg", "403 wit-refused upstream_error"),  # a smuggling-shaped head
])
def test_bodies_are_relayed_as_framed_and_malformed_heads_refused(path, answer):
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with EgressProxy(Policy(allow_loopback=True)) as proxy:
            assert fetch(proxy, f"http://127.0.0.1:{server.server_address[1]}{path}") == answer
        server.shutdown()
