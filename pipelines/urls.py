"""Image URL resolution and normalisation."""

from __future__ import annotations

from urllib.parse import quote, urljoin, urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters left as they are when re-quoting: RFC 3986 reserved and unreserved, and '%'.
_SAFE = "!#$%&'()*+,/:;=?@[]~"


def idna_host(host: str) -> str | None:
    """A host name in its ASCII (IDNA) form, lower-cased: `bücher.example` -> `xn--bcher-kva.example`;
    None if it cannot be encoded. UTS #46 mapping and IDNA 2008 as browsers do (`faß.de` ->
    `xn--fa-hia.de`), falling back to Python's IDNA 2003 codec for names the stricter rules reject
    (an underscore, a leading hyphen). ASCII names are only lower-cased."""
    if host.isascii():
        return host.lower()
    try:
        import idna

        return idna.encode(host, uts46=True).decode("ascii").lower()
    except (ImportError, UnicodeError, ValueError):  # idna.IDNAError is a UnicodeError
        pass
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


def normalise_url(url: str, base: str = "") -> tuple[str | None, str]:
    """(normalised absolute URL, "") or (None, reason). Resolves `url` against `base`, keeps http and
    https only, lower-cases scheme and host, converts an international host name to its IDNA form
    (`http://bücher.example/` -> `http://xn--bcher-kva.example/`: what goes on the wire), drops default
    ports and fragments, and percent-encodes spaces and non-ASCII characters."""
    url = url.strip()
    if not url:
        return None, "empty_url"
    if url[:5].lower() == "data:":
        return None, "data_uri"
    try:
        absolute = urljoin(base, url) if base else url
        parts = urlsplit(absolute)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            return None, "bad_scheme" if scheme else "relative_url"
        host = (parts.hostname or "").rstrip(".")
        if not host:
            return None, "no_host"
        port = parts.port
    except ValueError:
        return None, "malformed_url"
    if ":" not in host:  # not an IPv6 literal
        host = idna_host(host)
        if not host or not host.rstrip("."):
            return None, "bad_host"
        host = host.rstrip(".")
    netloc = host
    if ":" in host:  # IPv6 literal
        netloc = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    if parts.username or parts.password:
        return None, "credentials_in_url"
    path = quote(parts.path or "/", safe=_SAFE)
    query = quote(parts.query, safe=_SAFE)
    return urlunsplit((scheme, netloc, path, query, "")), ""
