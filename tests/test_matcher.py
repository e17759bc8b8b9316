"""The matcher equals plain, obviously-correct reference implementations of both modes."""

import re

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.match.matcher import QueryMatcher


def reference_words(text: str, queries: list[str]) -> list[int]:
    """Case-folded, on word boundaries: the query's words occur consecutively among the text's."""
    spaced = " " + " ".join(re.findall(r"\w+", text.casefold())) + " "
    out = []
    for qid, q in enumerate(queries):
        words = re.findall(r"\w+", q.casefold())
        if words and " " + " ".join(words) + " " in spaced:
            out.append(qid)
    return out


def reference_metaclip(text: str, queries: list[str]) -> list[int]:
    """MetaCLIP's rule, literally: spaced text, then `" q " in text`."""
    spaced = f" {text} "
    for p in [",", ".", ";", ":", "?", "!", "`"]:
        spaced = spaced.replace(p, f" {p} ")
    for c in ["\t", "\n", "\r"]:
        spaced = spaced.replace(c, " ")
    return [qid for qid, q in enumerate(queries) if f" {q} " in spaced]


REFERENCE = {"words": reference_words, "metaclip": reference_metaclip}

WORDS = ["dog", "Dog", "DOG", "hot", "hotdog", "dogs", "new", "york", "New", "York", "a", "A", "1", "99",
         "straße", "STRASSE", "ss", "ß", "İstanbul", "istanbul", "café", "cafe\u0301", "σ", "Σ", "ς",
         "ΣΑΣ", "x_y", "don't", "don", "t", "st.", "st", "C++", "c", "naïve", "東京", "東京タワー", "ﬁre",
         "fire", "ǅ", "ǆ", "e.g", "U.S", "u.s"]
SEPARATORS = [" ", " ", " ", "  ", ",", ", ", ".", ". ", "(", ")", "-", "\t", "\n", "\r", "!", "?", ";",
              ":", "`", "'", "’", "/", "\u00a0", "\u3000", "_"]

word = st.sampled_from(WORDS)
query = st.lists(word, min_size=1, max_size=3).map(" ".join)
text = st.lists(st.one_of(word, st.sampled_from(SEPARATORS)), max_size=25).map("".join)
any_text = st.text(max_size=40)
any_query = st.text(min_size=1, max_size=12).filter(
    lambda q: q == " ".join(q.split(" ")) and q.strip(" ") == q and "  " not in q
    and not any(c in q for c in "\t\n\r"))


def check(mode, texts, queries):
    got = QueryMatcher(queries, mode).match(texts).to_pylist()
    expected = [REFERENCE[mode](t, queries) for t in texts]
    assert got == expected


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(text, min_size=1, max_size=8), st.lists(query, min_size=1, max_size=12))
def test_words_mode_equals_reference(texts, queries):
    check("words", texts, queries)


@SETTINGS
@given(st.lists(text, min_size=1, max_size=8), st.lists(query, min_size=1, max_size=12))
def test_metaclip_mode_equals_reference(texts, queries):
    check("metaclip", texts, queries)


@SETTINGS
@given(st.lists(any_text, min_size=1, max_size=6), st.lists(any_query, min_size=1, max_size=8))
def test_both_modes_on_arbitrary_unicode(texts, queries):
    for mode in ("words", "metaclip"):
        check(mode, texts, queries)


def test_documented_examples():
    queries = ["dog", "new york", "hot dog", "York"]
    m = QueryMatcher(queries, "words")
    texts = ["(Dog)", "dog,", "Dog", "hotdog", "dogs", "I love New-York!", "a hot dog stand", None]
    assert m.match(texts).to_pylist() == [[0], [0], [0], [], [], [1, 3], [0, 2], []]
    meta = QueryMatcher(queries, "metaclip")
    assert meta.match(["(dog)", "dog, cat", "Dog", "New York", "new york."]).to_pylist() == [
        [], [0], [], [3], [1]]


def test_nested_and_overlapping_queries_all_match():
    queries = ["new", "york", "new york", "new york city", "york city", "city"]
    assert QueryMatcher(queries, "words").match(["New York City hall"]).to_pylist() == [[0, 1, 2, 3, 4, 5]]


def test_real_captions_against_the_reference(tmp_path):
    """Real alt texts from the archive WARC against real query entries."""
    from conftest import REPO

    from pipelines.candidates.stage import extract

    outputs = {"candidates": str(tmp_path / "c.parquet"), "rejects": str(tmp_path / "r.parquet")}
    extract(str(REPO / "data/warc/aut-example-2008.warc.gz"), "warc", "url", "caption", outputs)
    texts = pq.read_table(outputs["candidates"]).column("text").to_pylist()
    words = sorted({w for t in texts for w in re.findall(r"\w+", t)})
    queries = words[::2] + [" ".join(p) for p in zip(words[::7], words[1::7])] + ["Internet Archive", "the"]
    for mode in ("words", "metaclip"):
        got = QueryMatcher(queries, mode).match(pa.array(texts)).to_pylist()
        assert got == [REFERENCE[mode](t, queries) for t in texts]
        assert sum(map(bool, got)) > len(texts) // 3
