"""robots.txt: whether each site lets us fetch its image URLs, asked once per site and run.

Each origin's (scheme, host, port) robots.txt is fetched through the egress proxy, so the same
address checks, deadline and byte cap hold for it, and read with protego (Scrapy's parser: the RFC
9309 rules with Google's wildcards and longest match). What the answer means follows RFC 9309:

- 2xx: the rules of the group for our product token; a URL is fetched only if both the recipe's
  `user_agent_token` and img2dataset's own token (both are in the User-Agent it sends) may fetch it;
- 4xx, and the proxy's own refusals: no rules (the egress policy decides about the images);
- 5xx, 429 and an unreachable server: complete disallow, for this run of the partition.

Definite answers (2xx and 4xx) are kept in the run's cache, a small file per site, for 24 hours (the
longest RFC 9309 allows): the partitions of a run ask a site once between them, as a polite crawler
must when thousands of partitions share the big sites, and a partition rerun after a crash decides
as before. Server errors and unreachable sites are asked again by the next partition.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests
from protego import Protego

from wit_builder.workspace import atomic_write_bytes

MAX_BYTES = 512 * 1024  # RFC 9309: a crawler parses at least the first 500 KiB
ENGINE_TOKEN = "img2dataset"
CACHE_SECONDS = 24 * 3600


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def fetch(site: str, proxy: str, token: str, timeout: float) -> dict:
    """One origin's robots.txt as an answer that can be kept: {"rules": text} (2xx), {"allow": why}
    (no rules), or {"disallow": why} (every URL refused)."""
    session = requests.Session()
    session.trust_env = False  # the egress proxy, whatever the environment says
    session.max_redirects = 5  # RFC 9309 asks for at least five
    try:
        with session.get(f"{site}/robots.txt", proxies={"http": proxy, "https": proxy}, timeout=timeout,
                         headers={"User-Agent": f"{token} ({ENGINE_TOKEN})"}, stream=True) as r:
            status = r.status_code
            body = r.raw.read(MAX_BYTES, decode_content=True) if status < 300 else b""
    except requests.exceptions.ProxyError:
        return {"allow": "refused by the egress policy"}  # its images will be refused for that reason
    except requests.RequestException as e:
        return {"disallow": f"robots.txt unreachable ({type(e).__name__}): complete disallow"}
    finally:
        session.close()
    if status == 429 or status >= 500:
        return {"disallow": f"robots.txt answered HTTP {status}: complete disallow"}
    if status >= 400:
        return {"allow": f"HTTP {status}", "status": status}
    return {"rules": body.decode("utf-8", "replace"), "status": status}


def site_rules(site: str, proxy: str, token: str, timeout: float, cache: str | None = None) -> Protego | str | None:
    """One origin's rules; None when there are none (everything allowed), a message when every URL
    is disallowed. With a cache folder, a definite answer younger than a day is read from it."""
    name = hashlib.sha256(site.encode()).hexdigest()[:32]
    path = Path(cache) / name[:2] / f"{name}.json" if cache else None  # 256 folders: web scale has millions of sites
    answer = None
    if path is not None:
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
            if kept["site"] == site and 0 <= time.time() - kept["fetched"] < CACHE_SECONDS:
                answer = kept["answer"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or unreadable: ask the site
    if answer is None:
        answer = fetch(site, proxy, token, timeout)
        if path is not None and "status" in answer:  # a definite HTTP answer, not an error
            atomic_write_bytes(path, json.dumps({"site": site, "fetched": time.time(), "answer": answer}).encode())
    if "disallow" in answer:
        return answer["disallow"]
    return Protego.parse(answer["rules"]) if "rules" in answer else None


def disallowed(urls: list[str], proxy: str, token: str, timeout: float, threads: int = 32,
               cache: str | None = None) -> dict[int, str]:
    """{index: why} for the URLs whose site's robots.txt disallows them (answers kept in `cache`)."""
    sites = sorted({origin(u) for u in urls})
    with cf.ThreadPoolExecutor(max(1, min(threads, len(sites)))) as pool:
        rules = dict(zip(sites, pool.map(lambda s: site_rules(s, proxy, token, timeout, cache), sites)))
    refused = {}
    for i, url in enumerate(urls):
        r = rules[origin(url)]
        if isinstance(r, str):
            refused[i] = r
        elif r is not None and not (r.can_fetch(url, token) and r.can_fetch(url, ENGINE_TOKEN)):
            refused[i] = "disallowed by robots.txt"
    return refused
