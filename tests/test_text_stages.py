"""candidates -> filter -> match through the runner, on the real WARCs, checked end to end."""

import json
import re
import shutil

import pyarrow.parquet as pq
import pytest
from conftest import REPO, WORD_COUNTS, needs_wordnet, wit
from test_matcher import reference_words

STAGES = ("--stage", "queries", "--stage", "candidates", "--stage", "filter", "--stage", "match")
WARCS = [REPO / "data/warc" / n for n in ("aut-example-2008.warc.gz", "cc-main-2020-34-sample.warc.gz",
                                          "cc-main-2024-22-whirlwind.warc.gz")]


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    import tomli_w

    tmp = tmp_path_factory.mktemp("pairs")
    recipe = tmp / "pairs.toml"
    recipe.write_text(tomli_w.dumps({
        "run": {"name": "pairs", "root": str(tmp / "runs"), "workers": 2},
        "queries": {"unigram_counts": str(WORD_COUNTS), "wordnet": "/usr/share/wordnet"},
        "candidates": {"inputs": [str(p) for p in WARCS]},
        "filter": {"min_chars": 5},
    }))
    wit("run", recipe, *STAGES)
    return recipe, tmp / "runs" / "pairs"


@needs_wordnet
def test_matched_rows_equal_the_reference(pair_run):
    _, run_dir = pair_run
    queries = pq.read_table(run_dir / "queries/queries.parquet").column("query").to_pylist()
    def rows(folder, columns=None):
        return [r for p in sorted((run_dir / folder).glob("part-*.parquet"))
                for r in pq.read_table(p, columns=columns).to_pylist()]

    filtered = rows("filtered")
    candidates = rows("candidates", ["uid", "url"])
    matched = {r["uid"]: r for r in rows("matched", ["uid", "url", "text", "query_ids"])}
    assert len(filtered) == len(candidates) and len(matched) > 50
    # Words mode is the default. Check every kept row against the reference, on a query subset
    # (the reference is quadratic): the matcher's ids restricted to it must be the reference's.
    subset = range(0, len(queries), 97)
    sub_queries = [queries[i] for i in subset]
    for f in filtered:
        expected = [subset[i] for i in reference_words(f["text"], sub_queries)] if f["ok"] else []
        got = [q for q in matched[f["uid"]]["query_ids"] if q % 97 == 0] if f["uid"] in matched else []
        assert got == expected, f["text"]


@needs_wordnet
def test_counts_views_and_resume(pair_run):
    recipe, run_dir = pair_run
    counts = json.loads(wit("sql", run_dir, "SELECT sum(count) AS n FROM match_counts", "--json").stdout)
    links = json.loads(wit("sql", run_dir, "SELECT sum(len(query_ids)) AS n FROM matched", "--json").stdout)
    assert counts["n"] == links["n"] > 0
    funnel = wit("sql", run_dir, "SELECT coalesce(reason, 'kept') AS r, count(*) AS n FROM filtered GROUP BY 1 "
                 "ORDER BY 1", "--csv").stdout
    assert "kept," in funnel
    rerun = wit("run", recipe, *STAGES)
    assert "candidates: complete (3 partitions)" in rerun.stderr
    for stage in ("filter", "match"):
        assert f"{stage}: 3 partitions, 3 already complete, 0 to run" in rerun.stderr
    status = wit("status", run_dir).stdout
    assert "match        complete: 3 partitions" in status


@needs_wordnet
def test_a_copied_run_folder_carries_on_in_its_new_place(pair_run, tmp_path):
    """Fingerprints hold no path of the run folder: a copy (new paths, new mtimes) run by its folder
    has every partition complete, and answers queries."""
    _, run_dir = pair_run
    copy = tmp_path / "elsewhere" / "pairs"
    shutil.copytree(run_dir, copy, copy_function=shutil.copy)
    rerun = wit("run", copy, *STAGES).stderr
    assert f"run pairs -> {copy}" in rerun
    assert re.findall(r"(\d+) to run", rerun) and set(re.findall(r"(\d+) to run", rerun)) == {"0"}
    assert "candidates: complete (3 partitions)" in rerun
    ours = json.loads(wit("sql", copy, "SELECT count(*) AS n FROM matched", "--json").stdout)
    theirs = json.loads(wit("sql", run_dir, "SELECT count(*) AS n FROM matched", "--json").stdout)
    assert ours == theirs and ours["n"] > 50
