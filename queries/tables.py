"""Readers for the tables that can stand in for dump counting: unigram counts and pageviews."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import html
import io
import logging
import re
from html.entities import html5
from pathlib import Path

import duckdb

from wit_builder import storage
from wit_builder.errors import WitError

log = logging.getLogger("wit")


@contextlib.contextmanager
def _open_text(path: str):
    """A text file (plain, .gz or .bz2), local or in a store, read as strict UTF-8."""
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(Path(path).suffix)
    with storage.open_input(path) as raw, (opener(raw) if opener else contextlib.nullcontext(raw)) as data:
        yield io.TextIOWrapper(data, encoding="utf-8", errors="strict", newline="")


def is_clean_word(word: str) -> bool:
    """Count tables carry their tokenizer's artifacts ('"in', '-in', '[it', 'c.', '(;'): a word must
    begin and end with a letter or digit. Inner punctuation stays ('u.s', 'covid-19', "don't")."""
    return bool(word) and word[0].isalnum() and word[-1].isalnum()


# An entity whose `&` the table's tokenizer cut off: 'lt;br&gt' is `&lt;br&gt;`.
_ENTITY_HEAD = re.compile(r"(#\d+|#x[0-9a-f]+|[a-z][a-z0-9]*);", re.I)
_MARKUP_CHARS = re.compile(r'[<>\[\]{}|="]')
_CSS_WORD = (r"(?:background|color|colour|width|height|margin|padding|border|font|text|align|vertical"
             r"|display|float|white|left|right|center|top|bottom|middle|bold|italic|normal|none|solid)")
_MARKUP = re.compile(
    r"#[0-9a-f]{3}(?:[0-9a-f]{3})?\b"                                  # CSS colours: color:#e9e9e9
    rf"|^{_CSS_WORD}(?:-[a-z]+)*:"                                       # CSS declarations: width:50
    rf"|{_CSS_WORD};|;{_CSS_WORD}"                                       # text-align:left;vertical-align
    r"|^(?:category|file|image|template|wikipedia|portal|help|user|special|talk|module|draft|media"
    r"|mediawiki):"                                                      # namespace prefixes
    r"|^(?:formula|codice)_\d"                                          # WikiExtractor's placeholders
    r"|^\d*(?:x\d+)?px$",                                             # image and CSS sizes: 250px
    re.I,
)


def unescape_word(word: str) -> str:
    """HTML entities decoded, including one whose `&` was cut off at the start ('r&amp;b' -> 'r&b',
    'lt;br&gt' -> '<br>')."""
    m = _ENTITY_HEAD.match(word)
    if m and (m.group(1).startswith("#") or m.group(1) + ";" in html5):
        word = "&" + word
    return html.unescape(word) if "&" in word else word


def is_markup(word: str) -> bool:
    """Wikitext or HTML that a table's tokenizer took for a word: tags and attributes (`<br>`,
    `colspan=9`, `scope="row`, `align="right"|100`), brackets (`t]he`, from `[T]he`), italics turned into
    quotes (`billboard"s`), CSS (`color:#e9e9e9`, `left;vertical`), namespace prefixes (`category:20th`),
    placeholders (`formula_1`) and sizes (`250px`). Read after `unescape_word`."""
    return bool(_MARKUP_CHARS.search(word) or _MARKUP.search(word) or any(c.isspace() for c in word))


def read_unigram_table(path: str | Path) -> dict[str, int]:
    """`word;count` or `word<TAB>count` lines (plain, .gz or .bz2). Entities are decoded (`r&amp;b`
    counts as `r&b`); empty words, tokenizer artifacts (see `is_clean_word`) and markup (see
    `is_markup`) are dropped; a malformed line is skipped with a warning that names it."""
    path = str(path)
    if not storage.is_file(path):
        raise WitError("unigram count table not found", where=path)
    counts: dict[str, int] = {}
    bad: list[int] = []
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                sep = "\t" if "\t" in line else ";"
                word, _, count = line.rpartition(sep)
                if not _ or not count.strip().isdigit():
                    bad.append(lineno)
                    continue
                word = unescape_word(word.strip())
                if is_clean_word(word) and not is_markup(word):
                    counts[word] = counts.get(word, 0) + int(count)
    except UnicodeDecodeError as e:
        raise WitError(f"invalid UTF-8 ({e.reason})", where=str(path), record=f"line {lineno + 1}") from None
    except (OSError, EOFError) as e:
        raise WitError(f"unreadable table: {e}", where=str(path), record=f"after line {lineno}") from None
    if bad:
        log.warning("%s: skipped %d malformed lines (first: line %s)", path, len(bad), bad[0])
    if not counts:
        raise WitError("no `word;count` lines in the table", where=str(path))
    return counts


def read_pageviews(paths: list[str], projects: list[str]) -> dict[str, int]:
    """Views per title, summed over hourly pageview files (`project title views bytes`). Titles are
    returned as the dump spells them: underscores become spaces."""
    for p in paths:
        if not storage.is_file(p):
            raise WitError("pageview file not found", where=p)
    con = duckdb.connect()
    if paths and storage.is_object_url(paths[0]):
        storage.register_with_duckdb(con, paths[0])
    try:
        rows = con.execute(
            """
            SELECT replace(title, '_', ' ') AS title, sum(views)::BIGINT AS views
            FROM read_csv($files, delim=' ', header=false, quote='', escape='',
                          columns={'project': 'VARCHAR', 'title': 'VARCHAR',
                                   'views': 'BIGINT', 'bytes': 'VARCHAR'},
                          ignore_errors=true, null_padding=true)
            WHERE project IN (SELECT unnest($projects)) AND title IS NOT NULL AND views > 0
            GROUP BY 1
            """,
            {"files": [str(p) for p in paths], "projects": projects},
        ).fetchall()
    except duckdb.Error as e:
        raise WitError(f"unreadable pageview files: {e}", where=", ".join(paths)) from None
    return dict(rows)
