"""Reference implementations that benchmarks and tests measure wit-builder against."""

from __future__ import annotations

import mwparserfromhell

from queries.wikitext import normalise_title

# The same elements wit drops: references, formulas, code, galleries, and tables.
_DROP_TAGS = {"ref", "math", "chem", "ce", "gallery", "timeline", "syntaxhighlight", "source", "pre",
              "score", "imagemap", "hiero", "graph", "mapframe", "templatedata", "references", "table"}


def mwparser_plain_text(wikitext: str) -> str:
    """Plain prose by mwparserfromhell: a full wikitext parser, dropping what wit drops."""
    code = mwparserfromhell.parse(wikitext)
    for node in code.filter_tags(recursive=True):
        if str(node.tag).strip().lower() in _DROP_TAGS:
            try:
                code.remove(node)
            except ValueError:  # already gone with its parent
                pass
    for link in code.filter_wikilinks(recursive=True):
        if normalise_title(str(link.title)) is None:
            try:
                code.remove(link)
            except ValueError:
                pass
    return code.strip_code(normalize=True, collapse=True)
