"""Count one dump partition: unigrams, bigrams, article titles and link targets.

Each partition writes four small parquet files, sorted so equal input gives equal bytes. The global
sums (and PMI) are a reduce over them in DuckDB, which spills to disk rather than running out of
memory at full-Wikipedia scale.
"""

from __future__ import annotations

import logging
from collections import Counter

import pyarrow as pa

from wit_builder.workspace import write_parquet

from .dump import DumpPart, PageError, iter_page_bytes, parse_page
from .wikitext import BREAK_TOKENS, tokenize, wikitext_to_text

log = logging.getLogger("wit")

OUTPUTS = ("unigrams", "bigrams", "titles", "links", "errors")


def count_tokens(texts) -> tuple[Counter, Counter]:
    """Unigram and bigram counts over plain texts; bigrams never cross punctuation or lines."""
    unigrams: Counter = Counter()
    bigrams: Counter = Counter()
    for text in texts:
        tokens = tokenize(text)
        unigrams.update(tokens)
        bigrams.update(zip(tokens, tokens[1:]))
    for t in BREAK_TOKENS:
        unigrams.pop(t, None)
    bigrams = Counter({k: v for k, v in bigrams.items()
                       if k[0] not in BREAK_TOKENS and k[1] not in BREAK_TOKENS})
    return unigrams, bigrams


def count_part(path: str, start: int, end: int | None, outputs: dict[str, str]) -> dict:
    """The task function of the counting map: one dump partition in, five parquet files out."""
    part = DumpPart(path, start, end)
    unigrams: Counter = Counter()
    bigrams: Counter = Counter()
    links: Counter = Counter()
    titles: list[str] = []
    errors: list[tuple[int, str, str]] = []
    pages = articles = 0
    for offset, data in iter_page_bytes(part):
        pages += 1
        try:
            page = parse_page(offset, data)
        except PageError as e:
            # One bad page is skipped and recorded; the good ones around it still count.
            log.warning("%s: %s", path, e)
            errors.append((e.offset, e.title, e.reason))
            continue
        if page.ns != 0 or page.redirect:
            continue
        articles += 1
        titles.append(page.title)
        targets: list[str] = []
        uni, bi = count_tokens([wikitext_to_text(page.text, targets)])
        unigrams.update(uni)
        bigrams.update(bi)
        links.update(targets)

    uni_keys = sorted(unigrams)
    write_parquet(pa.table({"token": uni_keys, "count": [unigrams[k] for k in uni_keys]},
                           schema=pa.schema([("token", pa.string()), ("count", pa.int64())])),
                  outputs["unigrams"])
    bi_keys = sorted(bigrams)
    write_parquet(pa.table({"w1": [k[0] for k in bi_keys], "w2": [k[1] for k in bi_keys],
                            "count": [bigrams[k] for k in bi_keys]},
                           schema=pa.schema([("w1", pa.string()), ("w2", pa.string()),
                                             ("count", pa.int64())])),
                  outputs["bigrams"])
    write_parquet(pa.table({"title": sorted(titles)}, schema=pa.schema([("title", pa.string())])),
                  outputs["titles"])
    link_keys = sorted(links)
    write_parquet(pa.table({"target": link_keys, "count": [links[k] for k in link_keys]},
                           schema=pa.schema([("target", pa.string()), ("count", pa.int64())])),
                  outputs["links"])
    write_parquet(pa.table({"file": [path] * len(errors), "offset": [e[0] for e in errors],
                            "page": [e[1] for e in errors], "reason": [e[2] for e in errors]},
                           schema=pa.schema([("file", pa.string()), ("offset", pa.int64()),
                                             ("page", pa.string()), ("reason", pa.string())])),
                  outputs["errors"])
    return {"pages": pages, "articles": articles, "tokens": sum(unigrams.values()),
            "bad_pages": len(errors)}
