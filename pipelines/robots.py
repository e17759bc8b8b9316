"""robots.txt: whether each site lets us fetch its image URLs, asked once per site and partition.

Each origin's (scheme, host, port) robots.txt is fetched through the egress proxy, so the same
address checks, deadline and byte cap hold for it, and read with protego (Scrapy's parser: the RFC
9309 rules with Google's wildcards and longest match). What the answer means follows RFC 9309:

- 2xx: the rules of the group for our product token; a URL is fetched only if both the recipe's
  `user_agent_token` and img2dataset's own token (both are in the User-Agent it sends) may fetch it;
- 4xx, and the proxy's own refusals: no rules (the egress policy decides about the images);
- 5xx, 429 and an unreachable server: complete disallow, for this run of the partition.
"""

from __future__ import annotations

import concurrent.futures as cf
from urllib.parse import urlsplit

import requests
from protego import Protego

MAX_BYTES = 512 * 1024  # RFC 9309: a crawler parses at least the first 500 KiB
ENGINE_TOKEN = "img2dataset"


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def site_rules(site: str, proxy: str, token: str, timeout: float) -> Protego | str | None:
    """One origin's rules; None when there are none (everything allowed), a message when every URL
    is disallowed."""
    session = requests.Session()
    session.trust_env = False  # the egress proxy, whatever the environment says
    session.max_redirects = 5  # RFC 9309 asks for at least five
    try:
        with session.get(f"{site}/robots.txt", proxies={"http": proxy, "https": proxy}, timeout=timeout,
                         headers={"User-Agent": f"{token} ({ENGINE_TOKEN})"}, stream=True) as r:
            status = r.status_code
            body = r.raw.read(MAX_BYTES, decode_content=True) if status < 300 else b""
    except requests.exceptions.ProxyError:
        return None  # the proxy refused the host: its images will be refused for that reason
    except requests.RequestException as e:
        return f"robots.txt unreachable ({type(e).__name__}): complete disallow"
    finally:
        session.close()
    if status == 429 or status >= 500:
        return f"robots.txt answered HTTP {status}: complete disallow"
    if status >= 400:
        return None
    return Protego.parse(body.decode("utf-8", "replace"))


def disallowed(urls: list[str], proxy: str, token: str, timeout: float, threads: int = 32) -> dict[int, str]:
    """{index: why} for the URLs whose site's robots.txt disallows them."""
    sites = sorted({origin(u) for u in urls})
    with cf.ThreadPoolExecutor(max(1, min(threads, len(sites)))) as pool:
        rules = dict(zip(sites, pool.map(lambda s: site_rules(s, proxy, token, timeout), sites)))
    refused = {}
    for i, url in enumerate(urls):
        r = rules[origin(url)]
        if isinstance(r, str):
            refused[i] = r
        elif r is not None and not (r.can_fetch(url, token) and r.can_fetch(url, ENGINE_TOKEN)):
            refused[i] = "disallowed by robots.txt"
    return refused
