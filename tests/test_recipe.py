"""Recipes: strict, typed, relative to their file, and documented by the code."""

import typing

import pytest
from conftest import REPO

from wit_builder.errors import WitError
from wit_builder.recipe import load_recipe

REPO_DEMO = "pipelines/recipes/demo.toml"


def test_demo_recipe_loads_with_paths_relative_to_it():
    from conftest import REPO

    recipe = load_recipe(REPO / REPO_DEMO)
    assert recipe.run.name == "demo"
    assert recipe.path(recipe.queries.wikipedia[0]) == REPO / "data/wikipedia/enwiki-sample.xml.bz2"
    assert recipe.run.workers >= 1  # 0 means one per core


def test_the_cluster_template_is_a_valid_recipe_with_everything_in_a_store():
    from conftest import REPO

    recipe = load_recipe(REPO / "pipelines/recipes/wit400m.toml")
    assert recipe.run.executor == "ray" and recipe.run_store == "s3://YOUR-BUCKET/runs/wit400m"
    inputs = [*recipe.queries.wikipedia, *recipe.queries.pageviews, *recipe.candidates.inputs]
    assert inputs and all(i.startswith("s3://") for i in inputs)
    assert recipe.balance.t == 20_000 and recipe.queries.size == 500_000


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[run]\nname = "x"\n[queries]\nmin_cuont = 5\n')
    with pytest.raises(WitError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and "queries.min_cuont" in msg and "unknown key" in msg
    assert "min_count" in msg  # the allowed keys are listed


def test_bad_value_names_key_and_what_is_allowed(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[run]\nname = "x"\nexecutor = "spark"\n[queries]\nmin_count = 0\n')
    with pytest.raises(WitError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "run.executor" in msg and "'local' or 'ray'" in msg
    assert "queries.min_count" in msg and "greater than or equal to 1" in msg


def test_not_toml_and_missing_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[run\nname=")
    with pytest.raises(WitError, match="not valid TOML"):
        load_recipe(path)
    with pytest.raises(WitError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_resolved_recipe_is_saved_in_the_run(tmp_path):
    import tomllib

    from conftest import write_recipe

    from wit_builder.workspace import Run

    recipe = load_recipe(write_recipe(tmp_path, wikipedia=["dump.xml.bz2"]))
    run = Run(recipe)
    run.save_recipe()
    saved = tomllib.loads((run.dir / "recipe.toml").read_text())
    assert saved["queries"]["wikipedia"] == [str(tmp_path / "dump.xml.bz2")]
    assert saved["queries"]["quota"]["wordnet"] == 86_654  # defaults are filled in
    assert load_recipe(run.dir / "recipe.toml").queries == recipe.queries.model_copy(
        update={"wikipedia": [str(tmp_path / "dump.xml.bz2")]})


def test_allow_networks_must_be_networks(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[run]\nname = "x"\n[download]\nallow_networks = ["10.0.0.0/8", "10.0.0.0/33"]\n')
    with pytest.raises(WitError) as e:
        load_recipe(path)
    assert "download.allow_networks" in str(e.value) and "'10.0.0.0/33' is not a network" in str(e.value)


def test_the_recipe_reference_is_generated_from_the_code_and_current():
    from wit_builder.recipe_doc import render

    assert (REPO / "docs/recipe.md").read_text() == render(), "docs/recipe.md is stale: run make docs"


def test_every_recipe_key_says_what_it_means():
    from wit_builder.recipe import Section, recipe_model

    def undocumented(model, prefix):
        for key, field in model.model_fields.items():
            if not field.exclude:
                if not field.description and prefix:  # a top-level section: its class says it
                    yield f"{prefix}{key}"
                for t in (field.annotation, *typing.get_args(field.annotation)):
                    if isinstance(t, type) and issubclass(t, Section):
                        yield from undocumented(t, f"{prefix}{key}.")

    assert list(undocumented(recipe_model(), "")) == []
