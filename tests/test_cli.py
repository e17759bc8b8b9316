"""The `wit` command line on a real run: status, SQL over the stage parquet, and stable ids."""

import json

import pytest
from conftest import SAMPLE_DUMP, wit, write_recipe

from wit_builder.ids import seeded_uniform, uid


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(tmp, "cli", wikipedia=[str(SAMPLE_DUMP)], min_count=100, bigram_min_count=5,
                          min_pmi=8.0, title_min_inlinks=1)
    proc = wit("run", recipe)
    assert "wit sql" in proc.stderr  # it says how to query the result
    return tmp / "runs" / "cli"


def test_status_reports_partitions_and_rows(sample_run):
    out = wit("status", sample_run).stdout
    assert "queries      complete: 1 partitions; queries: " in out


def test_sql_answers_over_the_stage_parquet(sample_run):
    out = wit("sql", sample_run, "SELECT count(*) AS n FROM queries WHERE query = 'the'", "--json").stdout
    assert json.loads(out) == {"n": 1}
    out = wit("sql", sample_run,
              "SELECT s, count(*) AS n FROM (SELECT unnest(sources) s FROM queries) GROUP BY s ORDER BY s",
              "--csv").stdout.splitlines()
    assert out[0] == "s,n" and {line.split(",")[0] for line in out[1:]} == {"unigram", "bigram", "title"}
    import pyarrow.parquet as pq

    rows = pq.read_table(sample_run / "queries" / "queries.parquet").to_pylist()
    assert int(dict(line.split(",") for line in out[1:])["unigram"]) == sum(
        "unigram" in r["sources"] for r in rows) > 500


def test_sql_error_lists_the_views(sample_run):
    proc = wit("sql", sample_run, "SELECT * FROM nope", check=False)
    assert proc.returncode == 2 and "views: dump_errors, funnel, queries" in proc.stderr


def test_sql_to_parquet(sample_run, tmp_path):
    out = tmp_path / "q.parquet"
    wit("sql", sample_run, "SELECT * FROM queries ORDER BY query_id LIMIT 5", "--parquet", out)
    import pyarrow.parquet as pq

    assert pq.read_table(out).column("query_id").to_pylist() == [0, 1, 2, 3, 4]


def test_ids_are_stable():
    # Fixed values: a uid must never change between versions, machines or runs.
    assert uid("http://a/x.jpg", "a dog") == uid("http://a/x.jpg", "a dog") == "b21fdf777e78a167"
    assert uid("http://a/x.jpg", "a dog ") != uid("http://a/x.jpg", "a dog")
    u = seeded_uniform("b21fdf777e78a167", 7, seed=1)
    assert u == seeded_uniform("b21fdf777e78a167", 7, seed=1) and 0 <= u < 1
    assert u != seeded_uniform("b21fdf777e78a167", 7, seed=2)
    draws = [seeded_uniform(i, seed=0) for i in range(20000)]
    assert abs(sum(draws) / len(draws) - 0.5) < 0.01
