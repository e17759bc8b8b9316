"""Image URL resolution and normalisation."""

from __future__ import annotations

from urllib.parse import quote, urljoin, urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters left as they are when re-quoting: RFC 3986 reserved and unreserved, and '%'.
_SAFE = "!#$%&'()*+,/:;=?@[]~"


def normalise_url(url: str, base: str = "") -> tuple[str | None, str]:
    """(normalised absolute URL, "") or (None, reason). Resolves `url` against `base`, keeps http and
    https only, lower-cases scheme and host, drops default ports and fragments, and percent-encodes
    spaces and non-ASCII characters."""
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
