"""The query list: WordNet, unigram table, PMI bigrams, titles, and the merge under quotas."""

import gzip
import math

import pyarrow.parquet as pq
import pytest
from conftest import WORD_COUNTS, WORDNET, needs_wordnet, write_dump, write_recipe

from queries.stage import QueriesStage
from queries.tables import read_unigram_table
from queries.wordnet import wordnet_entries
from wit_builder.errors import WitError
from wit_builder.recipe import load_recipe
from wit_builder.runner import LocalExecutor, run_stage
from wit_builder.workspace import Run


def build(tmp_path, **queries) -> tuple[Run, list[dict]]:
    run = Run(load_recipe(write_recipe(tmp_path, **queries)))
    run_stage(QueriesStage(), run, LocalExecutor(1))
    return run, pq.read_table(run.dir / "queries" / "queries.parquet").to_pylist()


@needs_wordnet
def test_wordnet_gives_exactly_86654_entries():
    entries = wordnet_entries(WORDNET)
    assert len(entries) == 86_654 == len(set(entries))
    assert entries[:100] == [str(i) for i in range(100)]
    assert "dog" in entries and "living thing" in entries  # '_' became ' '
    assert "st" in entries  # st._john's_wort cut at the first '.', as MetaCLIP did
    assert all(e == e.lower() and e for e in entries)


def test_missing_wordnet_says_make_setup(tmp_path):
    with pytest.raises(WitError, match="make setup") as e:
        wordnet_entries(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)


def test_pmi_on_a_hand_checked_example(tmp_path):
    # Tokens: the cat sat . the dog sat . the cat ran .  -> N = 9 words;
    # c(the)=3, c(cat)=2, c(the cat)=2, so PMI = log2(2 * 9 / (3 * 2)) = log2(3).
    dump = write_dump(tmp_path / "d.xml.bz2", [("A", "The cat sat. The dog sat. The cat ran.")])
    _, rows = build(tmp_path, wikipedia=[str(dump)], bigram_min_count=2, min_pmi=0.0, min_count=3)
    bigrams = [r for r in rows if "bigram" in r["sources"]]
    assert [(r["query"], r["count"]) for r in bigrams] == [("the cat", 2)]
    assert bigrams[0]["pmi"] == pytest.approx(math.log2(3))
    assert [r["query"] for r in rows if "unigram" in r["sources"]] == ["the"]


def test_pmi_threshold_excludes_pairs_of_frequent_words(tmp_path):
    # "of the" is frequent but each word is more so: low PMI. "new york" only occurs together.
    text = " ".join(["new york."] * 5 + ["of the."] * 5 + ["the end of the day of the week."] * 5)
    dump = write_dump(tmp_path / "d.xml.bz2", [("A", text)])
    _, rows = build(tmp_path, wikipedia=[str(dump)], bigram_min_count=5, min_pmi=2.0, min_count=1000)
    bigrams = {r["query"]: r["pmi"] for r in rows if "bigram" in r["sources"]}
    # N = 60; c(of the) = 15, c(of) = 15, c(the) = 20: log2(15 * 60 / (15 * 20)) = log2(3) < 2.
    assert "of the" not in bigrams
    assert bigrams["new york"] == pytest.approx(math.log2(5 * 60 / (5 * 5)))


def test_titles_ranked_by_inlinks_keep_their_case(tmp_path):
    pages = [("Dog", "A [[Cat]] and a [[cat]]."), ("Cat", "See [[Dog]]."), ("Eel", "Nothing links here.")]
    dump = write_dump(tmp_path / "d.xml.bz2", pages)
    _, rows = build(tmp_path, wikipedia=[str(dump)], min_count=1000, bigram_min_count=1000,
                    title_min_inlinks=1)
    titles = [(r["query"], r["inlinks"]) for r in rows if r["sources"] == ["title"]]
    assert titles == [("Cat", 2), ("Dog", 1)]


def test_titles_by_pageviews(tmp_path):
    pages = [("Dog", "x"), ("Cat", "y"), ("New York", "z")]
    dump = write_dump(tmp_path / "d.xml.bz2", pages)
    views = tmp_path / "pageviews-20240101-000000.gz"
    with gzip.open(views, "wt") as f:
        f.write("en Dog 3 0\nen.m Dog 4 0\nde Cat 100 0\nen Cat 2 0\nen New_York 50 0\nbroken line\n")
    _, rows = build(tmp_path, wikipedia=[str(dump)], pageviews=[str(tmp_path / "pageviews-*.gz")],
                    title_min_views=5,
                    min_count=1000, bigram_min_count=1000)
    assert [(r["query"], r["views"]) for r in rows] == [("New York", 50), ("Dog", 7)]


def test_sources_merge_dedupe_and_quotas(tmp_path):
    table = tmp_path / "counts.txt"
    table.write_text(";999\ndog;500\ncat;400\nzebra;300\nemu;200\nrare;50\nbad line\n")
    dump = write_dump(tmp_path / "d.xml.bz2", [("Dog", "dog cat"), ("zebra", "[[Dog]]")])
    wn = tmp_path / "wn"
    wn.mkdir()
    for name, lines in {"data.noun": ["00001 03 n 01 dog 0 000 | a dog", "00002 03 n 01 Emu 0 000 | x"],
                        "data.verb": [], "data.adj": [], "data.adv": []}.items():
        (wn / name).write_text("  licence header\n" + "".join(line + "\n" for line in lines))
    _, rows = build(tmp_path, wikipedia=[str(dump)], unigram_counts=str(table), wordnet=str(wn),
                    min_count=100, bigram_min_count=1000, title_min_inlinks=1,
                    quota={"wordnet": 1000, "unigram": 2, "bigram": 0, "title": 5}, size=1000)
    by_query = {r["query"]: r for r in rows}
    assert [r["query_id"] for r in rows] == list(range(len(rows)))
    # WordNet first ("0".."99", then synsets), then unigrams by count, then titles.
    assert [r["query"] for r in rows[100:]] == ["dog", "emu", "cat", "zebra", "Dog"]
    assert by_query["dog"]["sources"] == ["wordnet", "unigram"] and by_query["dog"]["count"] == 500
    assert by_query["emu"]["sources"] == ["wordnet", "unigram"]  # lower-cased synset name
    assert by_query["Dog"]["sources"] == ["title"] and by_query["Dog"]["inlinks"] == 1
    assert "rare" not in by_query  # below min_count
    assert "" not in by_query  # the table's empty word is dropped


def test_size_caps_the_total(tmp_path):
    table = tmp_path / "counts.txt"
    table.write_text("".join(f"w{i};{1000 - i}\n" for i in range(50)))
    _, rows = build(tmp_path, unigram_counts=str(table), size=10)
    assert [r["query"] for r in rows] == [f"w{i}" for i in range(10)]


def test_real_unigram_table():
    counts = read_unigram_table(WORD_COUNTS)
    assert "" not in counts
    # 829,254 lines less the empty word, 4,983 tokenizer artifacts ('"in', '-in', 'c.', '(;') and
    # 4,768 entries of markup ('lt;br&gt', 'colspan=9', 'scope="row', 't]he', 'formula_1').
    assert len(counts) == 819_502
    assert sum(1 for c in counts.values() if c >= 100) == 272_646
    assert {"the", "u.s", "covid-19", "don't", "r&b", "at&t"} <= set(counts)  # r&amp;b, at&amp;t
    assert not {'"in', "-in", "c.", "(;", "'s", "r&amp;b", "lt;br&gt", "colspan=9", 't]he'} & set(counts)
