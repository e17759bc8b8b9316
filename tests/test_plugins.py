"""A stage from a package of its own: installed with pip into a folder of the test's, found through
its entry point, and run in a recipe with no change to the project."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, WORD_COUNTS, wit

WARC = REPO / "data/warc/aut-example-2008.warc.gz"

PLUGIN = '''
"""A caption blocklist: a gate after the filter that drops the captions naming a listed word."""

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.filter import FILTERED_SCHEMA
from wit_builder.recipe import Section
from wit_builder.runner import Manifest
from wit_builder.stage import Stage, View
from wit_builder.workspace import read_table, write_parquet


class BlocklistSettings(Section):
    words: list[str]
    """Lower-case words; a caption containing one is dropped."""


def block_part(filtered: str, words: list[str], output: str) -> dict:
    table = read_table(filtered)
    lowered = pc.utf8_lower(table.column("text"))
    reason = pa.nulls(table.num_rows, pa.string())
    for word in reversed(words):
        hit = pc.and_(table.column("ok"), pc.match_substring(lowered, word))
        reason = pc.if_else(hit, pa.scalar(f"blocklist:{word}"), reason)
    ok = pc.and_(table.column("ok"), pc.is_null(reason))
    reason = pc.if_else(table.column("ok"), reason, table.column("reason"))
    out = pa.table({"uid": table.column("uid"), "ok": ok, "reason": reason, "text": table.column("text")},
                   schema=FILTERED_SCHEMA)
    write_parquet(out, output)
    return {"blocked": table.num_rows - pc.sum(ok).as_py()}


class BlocklistStage(Stage):
    name = "blocklist"
    needs = ("filter",)
    refines = "filter"
    optional = True
    settings = BlocklistSettings
    provides = {"filtered": FILTERED_SCHEMA}
    views = (View("blocklisted", "blocklist/part-*.parquet"),)
    funnel = ("SELECT 'blocklist dropped' AS step, reason, count(*) AS rows FROM blocklisted "
              "WHERE reason LIKE 'blocklist:%' GROUP BY reason")

    def plan(self, run):
        up = self.needed(run, "filter")
        words = list(run.recipe.blocklist.words)
        tasks = [self.task(run, p.key, block_part,
                           kwargs={"filtered": p.file("filtered"), "words": words,
                                   "output": str(run.stage_dir("blocklist") / f"part-{p.key}.parquet")},
                           outputs=[str(run.stage_dir("blocklist") / f"part-{p.key}.parquet")],
                           inputs={"upstream": p.fingerprint, "words": words})
                 for p in up.parts()]
        yield tasks
        return Manifest(self.name, [p.entry(t, {"filtered": t.outputs[0]}) for t, p in zip(tasks, up.parts())])
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "wit-caption-blocklist"
version = "0.1.0"

[project.entry-points."wit_builder.stages"]
blocklist = "wit_caption_blocklist:BlocklistStage"

[tool.setuptools]
py-modules = ["wit_caption_blocklist"]
'''

@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The plugin package, pip-installed (no dependencies, no network) into a folder of its own."""
    tmp = tmp_path_factory.mktemp("plugin")
    (tmp / "pkg").mkdir()
    (tmp / "pkg/pyproject.toml").write_text(PYPROJECT)
    (tmp / "pkg/wit_caption_blocklist.py").write_text(textwrap.dedent(PLUGIN))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(tmp / "site"), str(tmp / "pkg")],
                   check=True, capture_output=True)
    return tmp / "site"


def with_plugin(site, *args, check=True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return wit(*args, check=check, env=env)


def write_recipe(tmp_path, words=None):
    import tomli_w

    doc = {"run": {"name": "plugin", "root": str(tmp_path / "runs"), "workers": 1},
           "queries": {"unigram_counts": str(WORD_COUNTS), "wordnet": "", "size": 20_000},
           "candidates": {"inputs": [str(WARC)]}}
    if words is not None:
        doc["blocklist"] = {"words": words}
    path = tmp_path / "plugin.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


UP_TO_MATCH = [a for s in ("queries", "candidates", "filter", "blocklist", "match") for a in ("--stage", s)]


def test_a_stage_from_another_package_runs_in_a_recipe(plugin_site, tmp_path):
    recipe = write_recipe(tmp_path, words=["stars"])
    run_dir = tmp_path / "runs/plugin"
    proc = with_plugin(plugin_site, "run", recipe, *UP_TO_MATCH)
    assert "blocklist: 1 partitions" in proc.stderr

    def sql(query):
        out = with_plugin(plugin_site, "sql", run_dir, query, "--json").stdout
        return [json.loads(line) for line in out.splitlines()]

    blocked = sql("SELECT count(*) AS n FROM blocklisted WHERE reason = 'blocklist:stars'")[0]["n"]
    assert blocked > 10  # the archive's reviews: "4 out of 5 stars"
    funnel = {(r["step"], r["reason"]): r["rows"] for r in sql("SELECT * FROM funnel")}
    assert funnel[("blocklist dropped", "blocklist:stars")] == blocked
    # The match stage read the plugin's decisions in place of the filter's: no blocked caption matched.
    leaked = sql("SELECT count(*) AS n FROM matched m JOIN blocklisted b USING (uid) WHERE NOT b.ok")[0]["n"]
    assert leaked == 0
    kept_by_filter = sql("SELECT count(*) AS n FROM filtered WHERE ok")[0]["n"]
    kept_by_plugin = sql("SELECT count(*) AS n FROM blocklisted WHERE ok")[0]["n"]
    assert kept_by_plugin == kept_by_filter - blocked
    status = with_plugin(plugin_site, "status", run_dir).stdout
    assert "blocklist    complete: 1 partitions" in status


def test_an_installed_optional_stage_changes_no_recipe_without_its_section(plugin_site, tmp_path):
    recipe = write_recipe(tmp_path)
    proc = with_plugin(plugin_site, "run", recipe, "--stage", "blocklist", check=False)
    assert proc.returncode == 2 and "unknown stage 'blocklist'" in proc.stderr


def test_a_misspelt_plugin_key_is_an_error_naming_it(plugin_site, tmp_path):
    recipe = write_recipe(tmp_path, words=["x"])
    recipe.write_text(recipe.read_text().replace("words", "wrods"))
    proc = with_plugin(plugin_site, "run", recipe, check=False)
    assert proc.returncode == 2 and "blocklist.wrods: unknown key; allowed: words" in proc.stderr


def test_stages_are_ordered_by_their_needs_whatever_order_they_are_found_in():
    from wit_builder.stage import Stage, data_flow_order

    def stage(name, needs=(), refines=""):
        return type(name, (Stage,), {"name": name, "needs": needs, "refines": refines})()

    stages = [stage("gate", ("b",), refines="b"), stage("c", ("b",)), stage("b", ("a",)), stage("a"),
              stage("gate2", ("b",), refines="b")]
    for found in (stages, stages[::-1]):
        names = [s.name for s in data_flow_order(found)]
        assert names.index("a") < names.index("b") < names.index("gate") < names.index("c")
        assert names.index("b") < names.index("gate2") < names.index("c")


def test_a_cycle_or_a_missing_stage_is_a_clear_error():
    from wit_builder.errors import WitError
    from wit_builder.stage import Stage, data_flow_order

    def stage(name, needs=()):
        return type(name, (Stage,), {"name": name, "needs": needs})()

    with pytest.raises(WitError, match="cycle"):
        data_flow_order([stage("a", ("b",)), stage("b", ("a",))])
    with pytest.raises(WitError, match="needs the stage 'nope', which is not installed"):
        data_flow_order([stage("a", ("nope",))])
