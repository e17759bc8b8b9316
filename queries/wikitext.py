"""Wikitext to plain text, and plain text to tokens.

Regular expressions run in C, so each pass over an article is cheap; nested constructs (templates in
templates, links in file captions) are removed innermost first, one pass per nesting level. This is
what makes dump counting several times faster than a full wikitext parser: we only need the words.
"""

from __future__ import annotations

import html
import re

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
# Tags whose content is not prose: references, formulas, code, galleries.
_DROP_ELEMENT = re.compile(
    r"<(ref|math|chem|ce|gallery|timeline|syntaxhighlight|source|pre|score|imagemap|hiero|graph"
    r"|mapframe|templatedata|references)\b[^>]*?(?:/>|>.*?</\1\s*>)",
    re.S | re.I,
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_EXTLINK = re.compile(r"\[(?:(?:https?|ftp):)?//[^\s\]]*\s*([^\]]*)\]")
_BARE_URL = re.compile(r"(?:https?|ftp)://[^\s<>\[\]]+")
_TAG = re.compile(r"<[^<>]*>")
_EMPHASIS = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")

# Link prefixes that are not articles: namespaces and their aliases. Interlanguage links are caught by
# the two-or-three-letter rule below.
_NON_ARTICLE = {
    "file", "image", "media", "category", "template", "wikipedia", "wp", "help", "portal", "user",
    "talk", "special", "module", "draft", "book", "mediawiki", "timedtext", "wikt", "wiktionary",
    "wikiquote", "q", "s", "wikisource", "commons", "meta", "b", "wikibooks", "n", "wikinews",
    "species", "v", "wikiversity", "voy", "d", "wikidata", "mw", "phab", "user talk", "project",
}
_LANG = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$")

# Words (letters and digits, with inner apostrophes) and the punctuation that breaks a bigram.
TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*|[.,;:!?()\[\]\"|\n]")
BREAK_TOKENS = frozenset(".,;:!?()[]\"|\n")


def normalise_title(target: str) -> str | None:
    """A link target as an article title ('foo_bar#x' -> 'Foo bar'), or None if it is no article."""
    target = target.split("#", 1)[0].replace("_", " ").strip()
    if not target:
        return None
    if ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if not prefix or prefix in _NON_ARTICLE or _LANG.match(prefix):
            return None
    target = " ".join(target.split())
    return target[0].upper() + target[1:]


def _sub_until_stable(pattern: re.Pattern, repl, text: str, marker: str) -> str:
    while marker in text:
        new = pattern.sub(repl, text)
        if new == text:
            break
        text = new
    return text


def wikitext_to_text(wikitext: str, links: list[str] | None = None) -> str:
    """Plain prose from wikitext. Article link targets are appended to `links` when given."""
    text = wikitext
    if "<!--" in text:
        text = _COMMENT.sub("", text)
    if "<" in text:
        text = _DROP_ELEMENT.sub(" ", text)
    text = _sub_until_stable(_TEMPLATE, "", text, "{{")
    text = _sub_until_stable(_TABLE, "\n", text, "{|")

    def link(m: re.Match) -> str:
        target, label = m.group(1), m.group(2)
        title = normalise_title(target)
        if title is None:
            return ""  # files, categories, interwiki: captions are not running prose
        if links is not None:
            links.append(title)
        return label if label is not None else target

    text = _sub_until_stable(_LINK, link, text, "[[")
    if "//" in text:
        text = _EXTLINK.sub(r"\1", text)
        text = _BARE_URL.sub(" ", text)
    if "<" in text:
        text = _TAG.sub(" ", text)
    if "''" in text:
        text = _EMPHASIS.sub("", text)
    if "__" in text:
        text = _MAGIC.sub("", text)
    if "&" in text:
        text = html.unescape(text)
    return text


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens, with bigram-breaking punctuation kept as its own tokens."""
    return TOKEN.findall(text.lower())
