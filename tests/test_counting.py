"""Wikitext to text and the per-partition counts, checked against counts made independently here."""

import re
from collections import Counter

import pyarrow.parquet as pq
from conftest import write_dump

from queries.counting import count_part
from queries.wikitext import normalise_title, wikitext_to_text

MARKUP = """'''Dog''' is a [[mammal|domestic mammal]].{{Infobox dog|weight={{convert|30|kg}}}} It barks.<ref name="a">Smith 2001, page four</ref>
<!-- hidden comment words -->
{| class="wikitable"
| cell || tablewords
|}
== History ==
Dogs lived with [[human]]s in [[Europe#North|northern Europe]] for ''ages''. See [http://example.org the site].
[[Category:Dogs]] [[File:Dog.jpg|thumb|A [[puppy]] sleeping]] [[fr:Chien]]"""
PROSE = "Dog is a domestic mammal. It barks. History. Dogs lived with humans in northern Europe for ages. See the site."


def words(text: str) -> Counter:
    return Counter(re.findall(r"[a-z]+", text.lower()))


def test_wikitext_keeps_prose_and_drops_markup():
    links: list[str] = []
    text = wikitext_to_text(MARKUP, links)
    assert words(text) == words(PROSE)
    for gone in ("Infobox", "Smith", "hidden", "tablewords", "Category", "thumb", "Chien", "http"):
        assert gone not in text
    assert {"Mammal", "Human", "Europe"} <= set(links)
    assert "Category:Dogs" not in links and "Dog.jpg" not in " ".join(links)


def test_normalise_title():
    assert normalise_title("dog_breed#History") == "Dog breed"
    assert normalise_title("Star Wars: A New Hope") == "Star Wars: A New Hope"
    assert normalise_title("Category:Dogs") is None
    assert normalise_title("de:Hund") is None


def read(path):
    return pq.read_table(path).to_pylist()


def test_counts_match_independent_counts(tmp_path):
    pages = [
        ("Dog", MARKUP),
        ("Cat", "The cat sat on the mat. The cat ran, the dog sat."),
        ("Old dog", "#REDIRECT [[Dog]]", 0, "Dog"),
        ("Talk:Dog", "talk page words never count", 1),
    ]
    dump = write_dump(tmp_path / "d.xml.bz2", pages)
    outputs = {n: str(tmp_path / f"{n}.parquet") for n in ("unigrams", "bigrams", "titles", "links", "errors")}
    info = count_part(str(dump), 0, None, outputs)
    assert info == {"pages": 4, "articles": 2, "tokens": sum(words(PROSE + " " + pages[1][1]).values()),
                    "bad_pages": 0}

    expected = words(PROSE) + words(pages[1][1])
    assert {r["token"]: r["count"] for r in read(outputs["unigrams"])} == expected

    bigrams = {(r["w1"], r["w2"]): r["count"] for r in read(outputs["bigrams"])}
    # Independent: bigrams within each run of words between punctuation.
    exp_bi = Counter()
    for text in (PROSE, pages[1][1]):
        for segment in re.split(r"[.,]", text.lower()):
            toks = re.findall(r"[a-z]+", segment)
            exp_bi.update(zip(toks, toks[1:]))
    assert bigrams == exp_bi
    assert bigrams[("the", "cat")] == 2 and ("mat", "the") not in bigrams  # no bigram across '.'

    assert [r["title"] for r in read(outputs["titles"])] == ["Cat", "Dog"]
    assert {r["target"]: r["count"] for r in read(outputs["links"])}["Mammal"] == 1


def test_real_sample_unigrams_agree_with_mwparserfromhell(sample_xml, tmp_path):
    """Our regex stripping against a full wikitext parser (bench/baselines.py) on real articles."""
    import bz2
    import sys
    import xml.etree.ElementTree as ET

    from conftest import REPO

    from queries.wikitext import tokenize

    sys.path.insert(0, str(REPO / "bench"))
    from baselines import mwparser_plain_text

    kept, theirs = [], Counter()
    for raw in re.findall(rb"  <page>.*?</page>\n", sample_xml, re.S):
        el = ET.fromstring(raw)
        if el.findtext("ns") != "0" or el.find("redirect") is not None:
            continue
        text = el.findtext("revision/text") or ""
        theirs.update(t for t in tokenize(mwparser_plain_text(text)) if t[0].isalnum())
        kept.append(raw)
        if len(kept) == 15:
            break
    dump = tmp_path / "first.xml.bz2"
    dump.write_bytes(bz2.compress(b"<mediawiki>\n" + b"".join(kept) + b"</mediawiki>\n"))
    outputs = {n: str(tmp_path / f"{n}.parquet") for n in ("unigrams", "bigrams", "titles", "links", "errors")}
    count_part(str(dump), 0, None, outputs)
    ours = {r["token"]: r["count"] for r in read(outputs["unigrams"])}
    # The documented tolerance (bench/README.md): total absolute difference at most 3% of all tokens,
    # and 90% of the 200 most frequent words within 5% each.
    words_all = set(ours) | set(theirs)
    l1 = sum(abs(ours.get(w, 0) - theirs[w]) for w in words_all)
    assert l1 <= 0.03 * sum(theirs.values())
    top = [w for w, _ in theirs.most_common(200)]
    close = [w for w in top if abs(ours.get(w, 0) - theirs[w]) <= 0.05 * theirs[w]]
    assert len(close) >= 0.9 * len(top), sorted(set(top) - set(close))
