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

from .dump import DumpPart, PageError, iter_page_bytes, parse_page, read_site
from .wikitext import BREAK_TOKENS, tokenize, wikitext_to_text

log = logging.getLogger("wit")

OUTPUTS = ("unigrams", "bigrams", "titles", "links", "errors")


class TokenCounter:
    """Unigram and bigram counts over plain texts; bigrams never cross punctuation or lines.

    Tokens go straight into two Counters (counted in C); the punctuation tokens that break bigrams
    are removed once, at the end, rather than per text.
    """

    def __init__(self) -> None:
        self.unigrams: Counter = Counter()
        self.bigrams: Counter = Counter()

    def add(self, text: str) -> None:
        tokens = tokenize(text)
        self.unigrams.update(tokens)
        self.bigrams.update(zip(tokens, tokens[1:]))

    def finish(self) -> tuple[Counter, Counter]:
        for t in BREAK_TOKENS:
            self.unigrams.pop(t, None)
        for pair in [p for p in self.bigrams if p[0] in BREAK_TOKENS or p[1] in BREAK_TOKENS]:
            del self.bigrams[pair]
        return self.unigrams, self.bigrams


def _counts_table(counter: Counter, names: list[str]) -> pa.Table:
    """A counter as a table sorted by its key (so equal counts give equal bytes); sorted in C++."""
    if len(names) == 1:
        columns = {names[0]: pa.array(list(counter), pa.string())}
    else:
        keys = list(counter)
        columns = {name: pa.array([k[i] for k in keys], pa.string()) for i, name in enumerate(names)}
    columns["count"] = pa.array(list(counter.values()), pa.int64())
    return pa.table(columns).sort_by([(n, "ascending") for n in names])


def count_part(path: str, start: int, end: int | None, outputs: dict[str, str]) -> dict:
    """The task function of the counting map: one dump partition in, five parquet files out."""
    part = DumpPart(path, start, end)
    site = read_site(path)  # namespaces and language, from the file's <siteinfo>
    tokens = TokenCounter()
    links: Counter = Counter()
    titles: list[str] = []
    errors: list[tuple[int, str, str]] = []
    pages = articles = 0
    for offset, data in iter_page_bytes(part):
        pages += 1
        try:
            page = parse_page(offset, data, site)
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
        tokens.add(wikitext_to_text(page.text, targets, site))
        links.update(targets)

    unigrams, bigrams = tokens.finish()
    write_parquet(_counts_table(unigrams, ["token"]), outputs["unigrams"])
    write_parquet(_counts_table(bigrams, ["w1", "w2"]), outputs["bigrams"])
    write_parquet(pa.table({"title": sorted(titles)}, schema=pa.schema([("title", pa.string())])),
                  outputs["titles"])
    write_parquet(_counts_table(links, ["target"]), outputs["links"])
    write_parquet(pa.table({"file": [path] * len(errors), "offset": [e[0] for e in errors],
                            "page": [e[1] for e in errors], "reason": [e[2] for e in errors]},
                           schema=pa.schema([("file", pa.string()), ("offset", pa.int64()),
                                             ("page", pa.string()), ("reason", pa.string())])),
                  outputs["errors"])
    return {"pages": pages, "articles": articles, "tokens": sum(unigrams.values()),
            "bad_pages": len(errors)}
