"""Wikitext to plain text, and plain text to tokens.

Regular expressions run in C, so each pass over an article is cheap; nested constructs (templates in
templates, links in file captions) are removed innermost first, one pass per nesting level. This is
what makes dump counting several times faster than a full wikitext parser: we only need the words.

Which link prefixes are namespaces depends on the wiki: a `Site` holds the dump's own namespace names
and aliases (from its `<siteinfo>`) besides the canonical English ones every MediaWiki accepts, and the
image-link options of the dump's language.
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
_LINK_TARGET = re.compile(r"[^\[\]|\n]*")
_EXTLINK = re.compile(r"\[(?:(?:https?|ftp):)?//[^\s\]]*\s*([^\]]*)\]")
_BARE_URL = re.compile(r"(?:https?|ftp)://[^\s<>\[\]]+")
# Superscripts and subscripts belong to their word: km<sup>2</sup> is "km2", H<sub>2</sub>O is "H2O".
_SUP_SUB = re.compile(r"</?su[pb]\b[^<>]*>", re.I)
_TAG = re.compile(r"<[^<>]*>")
# Tags that only appear once entities are unescaped (`&lt;br&gt;` in the wikitext): HTML-shaped only,
# so that a prose "x < 5 and y > 3" is left alone.
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_EMPHASIS = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")
_MEDIA_FILE = re.compile(
    r"\.(?:jpe?g|png|gif|svg|tiff?|webp|bmp|xcf|pdf|djvu|ogg|ogv|oga|webm|mp3|mp4|wav|flac|midi?|stl)$",
    re.I)


def _norm(name: str) -> str:
    """A namespace name as compared: case-folded, `_` as a space, single spaces."""
    return " ".join(name.replace("_", " ").split()).casefold()


# Namespaces every MediaWiki accepts by their canonical English names, whatever its language, plus
# English Wikipedia's own; a dump's <siteinfo> adds (or renames) its own names and aliases.
CANONICAL_NAMESPACES = {
    "media": -2, "special": -1, "talk": 1, "user": 2, "user talk": 3, "project": 4, "project talk": 5,
    "file": 6, "file talk": 7, "image": 6, "image talk": 7, "mediawiki": 8, "mediawiki talk": 9,
    "template": 10, "template talk": 11, "help": 12, "help talk": 13, "category": 14,
    "category talk": 15, "wikipedia": 4, "wikipedia talk": 5, "wp": 4, "wt": 5, "portal": 100,
    "portal talk": 101, "book": 108, "book talk": 109, "draft": 118, "draft talk": 119,
    "timedtext": 710, "timedtext talk": 711, "module": 828, "module talk": 829,
}
# Interwiki prefixes (sister projects). Interlanguage links are caught by the two-or-three-letter rule.
_INTERWIKI = {
    "wikt", "wiktionary", "wikiquote", "q", "s", "wikisource", "commons", "meta", "b", "wikibooks", "n",
    "wikinews", "species", "v", "wikiversity", "voy", "d", "wikidata", "mw", "phab",
}
_LANG = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$")

# Image-link options (MediaWiki's `img_*` magic words, from languages/messages/Messages*.php): bare
# words, `word=value` keys, and the units of `<n>px`. English ones are valid on every wiki.
_IMAGE_OPTIONS: dict[str, tuple[str, str, str]] = {
    "en": ("thumbnail thumb frame framed enframed frameless border left right center centre none upright"
           " baseline sub super sup top text-top middle bottom text-bottom",
           "thumbnail thumb upright alt link page class lang", "px"),
    "bg": ("мини вдясно дясно д вляво ляво л н център центр ц рамка врамка безрамка ръб контур",
           "мини", "пкс п"),
    "ru": ("мини миниатюра справа слева без центр обрамить безрамки сверхусправа граница основание под"
           " над сверху текст-сверху посередине снизу текст-снизу",
           "мини миниатюра страница сверхусправа ссылка альт", "пкс"),
    "de": ("miniatur rechts links ohne zentriert gerahmt rahmenlos hochkant rand tiefgestellt",
           "miniatur seite hochkant", "px"),
    "es": ("miniaturadeimagen miniatura mini derecha dcha der izquierda izda izq ninguna nada no ninguno"
           " centro centrado centrada centrar marco enmarcado enmarcada sinmarco sin_enmarcar sinenmarcar"
           " borde", "miniaturadeimagen miniatura pagina página", "px"),
    "pt": ("miniaturadaimagem miniatura direita esquerda nenhum centro commoldura comborda semmoldura"
           " semborda superiordireito borda", "miniaturadaimagem miniatura página superiordireito", "px"),
    "ro": ("miniatura mini dreapta stanga nu centru cadru faracadru dreaptasus chenar",
           "miniatura mini pagina dreaptasus", "px"),
}

# Words (letters and digits, with inner apostrophes; numbers keep their decimal point or separator:
# 67.5, 1,000) and the punctuation that breaks a bigram.
TOKEN = re.compile(r"[^\W_]+(?:(?:['’]|(?<=\d)[.,](?=\d))[^\W_]+)*|[.,;:!?()\[\]\"|\n]")
BREAK_TOKENS = frozenset(".,;:!?()[]\"|\n")


class Site:
    """What link and title prefixes mean on one wiki: its namespaces (name or alias -> key), and the
    image-link options of its language."""

    def __init__(self, lang: str = "en", namespaces: dict[str, int] | None = None):
        self.lang = (lang or "en").lower()
        names = dict(CANONICAL_NAMESPACES)
        for name, key in (namespaces or {}).items():
            if _norm(name):
                names[_norm(name)] = key
        self.namespaces = names
        self.non_article = {n for n, k in names.items() if k != 0} | _INTERWIKI
        words, keys, units = set(), set(), set()
        for code in dict.fromkeys(["en", self.lang, self.lang.split("-")[0]]):
            w, k, u = _IMAGE_OPTIONS.get(code, ("", "", ""))
            words.update(w.split())
            keys.update(k.split())
            units.update(u.split())
        self.image_words = frozenset(words)
        key_names = "|".join(map(re.escape, sorted(keys)))
        unit_names = "|".join(map(re.escape, sorted(units, key=len, reverse=True)))
        self._image_key = re.compile(rf"(?:{key_names})\s*=", re.I)
        self._image_size = re.compile(rf"(?=.*\d)\d*(?:x\d+)?\s*(?:{unit_names})", re.I)

    def namespace_of(self, title: str) -> int:
        """The namespace of a page title from its prefix (for dumps without `<ns>` tags)."""
        if ":" not in title:
            return 0
        return self.namespaces.get(_norm(title.split(":", 1)[0]), 0)

    def is_image_option(self, param: str) -> bool:
        p = param.strip()
        return (p.casefold() in self.image_words or bool(self._image_size.fullmatch(p))
                or bool(self._image_key.match(p)))

    def is_media_link(self, target: str, params: list[str]) -> bool:
        """An image link whose prefix is not a known namespace, recognised by its shape: a media file
        name, or an image option (`250px`, `thumb`, the language's `мини`) among its parameters."""
        if ":" not in target:
            return False
        return bool(_MEDIA_FILE.search(target.strip())) or any(map(self.is_image_option, params))

    def title(self, target: str) -> str | None:
        """A link target as an article title ('foo_bar#x' -> 'Foo bar'), or None if it is no article."""
        target = target.split("#", 1)[0].replace("_", " ").strip()
        if not target:
            return None
        if ":" in target:
            prefix = _norm(target.split(":", 1)[0])
            if not prefix or prefix in self.non_article or _LANG.match(prefix):
                return None
        target = " ".join(target.split())
        return target[0].upper() + target[1:]


ENGLISH = Site()


def normalise_title(target: str, site: Site = ENGLISH) -> str | None:
    """A link target as an article title ('foo_bar#x' -> 'Foo bar'), or None if it is no article."""
    return site.title(target)


def _sub_until_stable(pattern: re.Pattern, repl, text: str, marker: str) -> str:
    while marker in text:
        new = pattern.sub(repl, text)
        if new == text:
            break
        text = new
    return text


def _drop_unclosed_media_links(text: str, site: Site) -> str:
    """File, category and interwiki links that the link pattern could not take, because their caption
    holds single brackets (`[above]`, `Bicyclo[1.1.0]butane`, an external link): each is removed up to
    its balancing `]]`, or to the end of its paragraph when it has none. Other `[[` are left alone."""
    out, pos, scan = [], 0, 0
    while (i := text.find("[[", scan)) >= 0:
        target = _LINK_TARGET.match(text, i + 2).group(0)
        if ":" not in target or (site.title(target) is not None and not site.is_media_link(target, [])):
            scan = i + 2
            continue
        depth, j, end = 0, i, None
        stop = text.find("\n\n", i)
        stop = len(text) if stop < 0 else stop
        while j < stop:
            c = text[j]
            if c == "[":
                depth += 1
            elif c == "]":
                depth -= 1
                if depth == 0:
                    end = j + 1
                    break
            j += 1
        out.append(text[pos:i])
        pos = scan = end if end is not None else stop
    out.append(text[pos:])
    return "".join(out)


def wikitext_to_text(wikitext: str, links: list[str] | None = None, site: Site = ENGLISH) -> str:
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
        title = site.title(target)
        if title is None or site.is_media_link(target, label.split("|") if label is not None else []):
            return ""  # files, categories, interwiki: captions are not running prose
        if links is not None:
            links.append(title)
        return label if label is not None else target

    text = _sub_until_stable(_LINK, link, text, "[[")
    if "[[" in text:
        text = _drop_unclosed_media_links(text, site)
    if "//" in text:
        text = _EXTLINK.sub(r"\1", text)
        text = _BARE_URL.sub(" ", text)
    if "<" in text:
        text = _SUP_SUB.sub("", text)
        text = _TAG.sub(" ", text)
    if "''" in text:
        text = _EMPHASIS.sub("", text)
    if "__" in text:
        text = _MAGIC.sub("", text)
    if "&" in text:
        text = html.unescape(text)
        if "<" in text:
            text = _HTML_TAG.sub(" ", text)
    return text


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens, with bigram-breaking punctuation kept as its own tokens."""
    return TOKEN.findall(text.lower())
