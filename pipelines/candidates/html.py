"""Image candidates from an HTML page: <img> alt text, the largest srcset entry."""

from __future__ import annotations

import re

from ..urls import normalise_url
from .collector import Collector

_SRCSET_ITEM = re.compile(r"\s*(\S+?)(?:\s+([\d.]+)([wx]))?\s*(?:,|$)")


def largest_srcset(srcset: str) -> str:
    """The srcset candidate with the largest width or density descriptor."""
    best, best_size = "", -1.0
    for m in _SRCSET_ITEM.finditer(srcset):
        if not m.group(1):
            continue
        size = float(m.group(2)) if m.group(2) else 1.0
        if size > best_size:
            best, best_size = m.group(1), size
    return best


def html_images(collector: Collector, body: bytes, page_url: str, origin: str, charset: str | None = None) -> int:
    """Every <img> with a text (alt, else title) and a usable URL (src, else data-src, else the
    largest srcset entry), resolved against <base href> or the page URL. Decoded as browsers do: by
    the HTTP header's charset, else the page's <meta charset>, else a guess from the bytes."""
    from resiliparse.parse.encoding import detect_encoding, map_encoding_to_html5
    from resiliparse.parse.html import HTMLTree

    encoding = (map_encoding_to_html5(charset, fallback_utf8=False) if charset else None) or \
        detect_encoding(body, from_html_meta=True)
    tree = HTMLTree.parse_from_bytes(body, encoding)
    base = page_url
    base_el = tree.document.query_selector("base[href]")
    if base_el is not None:
        base = normalise_url(base_el.getattr("href") or "", page_url)[0] or page_url
    images = 0
    for img in tree.document.query_selector_all("img"):
        images += 1
        alt, title = img.getattr("alt") or "", img.getattr("title") or ""
        text, text_attr = (alt, "alt") if alt.strip() else (title, "title")
        if not text.strip():
            collector.reject(origin, "no_text", img.getattr("src") or "")
            continue
        src = (img.getattr("src") or "").strip()
        if src and not src.lower().startswith("data:"):
            url, url_attr = src, "src"
        elif (img.getattr("data-src") or "").strip():
            url, url_attr = img.getattr("data-src"), "data-src"
        elif (img.getattr("srcset") or "").strip():
            url, url_attr = largest_srcset(img.getattr("srcset")), "srcset"
        else:
            collector.reject(origin, "data_uri" if src else "no_image_url", src[:100])
            continue
        collector.add(url, text, base, page_url, origin, f"{url_attr}:{text_attr}")
    return images
