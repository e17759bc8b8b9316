"""Recipes: one TOML file names a whole run. It is validated into typed settings here.

Relative paths in a recipe are relative to the recipe file's own folder, so a recipe can be run from
anywhere. `run.root` (where run folders go) is the exception: it is relative to the current folder.
"""

from __future__ import annotations

import glob
import os
import tomllib
from functools import cache
from pathlib import Path
from typing import Literal, get_args

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from . import storage
from .errors import WitError


class Section(BaseModel):
    """A recipe section. A stage's own section subclasses this; attribute docstrings are its
    reference (docs/recipe.md is generated from them)."""

    # A misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


def input_path(default="", kind: str = "file"):
    """A field that names inputs (a path, or a list of paths and glob patterns) relative to the
    recipe's folder: resolved in the saved recipe, and (files) checked before anything runs."""
    return Field(default=default, json_schema_extra={"input_path": kind})


def is_input_path(field, kind: str = "") -> bool:
    found = (field.json_schema_extra or {}).get("input_path")
    return bool(found) and (not kind or found == kind)


class RunSettings(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """The run's name: its folder is `root/name`."""
    root: str = "runs"
    """Where run folders go: a folder (relative to the current folder), or a prefix in an object
    store (`s3://bucket/runs`)."""
    staging: str = ""
    """For a root in a store: the local folder where each node stages the files it writes before
    uploading them (empty: `~/.cache/wit-builder/staging`)."""
    seed: int = 0
    """Seeds every random choice (balancing draws, shard order)."""
    executor: Literal["local", "ray"] = "local"
    """`local`: a process pool on this machine; `ray`: Ray tasks (`pip install 'wit-builder[ray]'`)."""
    workers: int = Field(default=0, ge=0)
    """Tasks at once; 0 means one per CPU core."""
    ray_address: str = ""
    """Empty: start a local Ray cluster; otherwise e.g. `auto` or `ray://head:10001`."""
    task_retries: int = Field(default=3, ge=0)
    """With Ray: how many times a task lost with its worker or node (not one that raised) is run
    again before the step fails. Tasks are idempotent, so a rerun writes the same bytes."""


class Recipe(Section):
    """A whole run: `[run]` and one section per stage (see `recipe_model`)."""

    run: RunSettings

    # Where the recipe was read from; paths in it are relative to this folder.
    base_dir: str = Field(default=".", exclude=True)

    @field_validator("run")
    @classmethod
    def _workers_default(cls, run: RunSettings) -> RunSettings:
        if run.workers == 0:
            return run.model_copy(update={"workers": os.cpu_count() or 1})
        return run

    def path(self, value: str) -> Path | str:
        """Resolve a path from the recipe against the recipe's folder; an object-store URL (s3://...)
        stays as it is."""
        if storage.is_object_url(value):
            return value
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    def paths(self, values: list[str], key: str) -> list[str]:
        """Resolve a list of paths, expanding glob patterns (sorted, so the order is stable)."""
        out = []
        for value in values:
            path = str(self.path(value))
            if any(c in path for c in "*?["):
                matches = storage.glob(path) if storage.is_object_url(path) else sorted(glob.glob(path))
                if not matches:
                    raise WitError(f"no file matches {value!r}", where=f"recipe {key}")
                out += matches
            else:
                out.append(path)
        return out

    def missing_inputs(self, stages: list[str]) -> list[str]:
        """Every input path of the recipe that the given stages read and that does not exist, as
        `key: path` lines: checked before any stage runs, so a typo costs seconds, not hours."""
        from .stage import pipeline

        chosen = pipeline(self)
        return [m for name in stages for m in chosen[name].check_inputs(self)]

    @property
    def run_dir(self) -> Path:
        """The run folder; for a run in a store, its local staging folder (see workspace)."""
        if self.run_store:
            staging = self.run.staging or os.path.join(os.path.expanduser("~"), ".cache", "wit-builder", "staging")
            return Path(staging).resolve() / self.run_store.split("://", 1)[1]
        return Path(self.run.root).resolve() / self.run.name

    @property
    def run_store(self) -> str:
        """The run folder's URL when `run.root` is in an object store, else ""."""
        if storage.is_object_url(self.run.root):
            return self.run.root.rstrip("/") + "/" + self.run.name
        return ""

    def resolved_toml(self) -> str:
        """The recipe with every default filled in and every input path made absolute."""
        data = self.model_dump(mode="json")
        for name in type(self).model_fields:
            section = getattr(self, name)
            if not isinstance(section, Section):
                continue
            for key, field in type(section).model_fields.items():
                value = getattr(section, key)
                if is_input_path(field) and value:
                    resolved = self.paths(value, f"{name}.{key}") if isinstance(value, list) else str(self.path(value))
                    data[name][key] = resolved
        if not self.run_store:
            data["run"]["root"] = str(Path(self.run.root).resolve())
        return tomli_w.dumps(data)


def check_paths(recipe: Recipe, name: str, section: Section) -> list[str]:
    """The input paths of one section (its `input_path` fields) that do not exist."""
    problems = []
    for key, field in type(section).model_fields.items():
        value = getattr(section, key)
        if not is_input_path(field, "file") or not value:  # a folder's stage knows what must be in it
            continue
        try:
            paths = recipe.paths(value, f"{name}.{key}") if isinstance(value, list) else [str(recipe.path(value))]
        except WitError as e:
            problems.append(f"{name}.{key}: {e}")
            continue
        problems += [p for p in (missing_file(f"{name}.{key}", path) for path in paths) if p]
    return problems


def missing_file(key: str, path: str | Path, kind: str = "file") -> str | None:
    """`key: path: ... not found` when an input (a file, or a folder with kind="folder") is not there."""
    if storage.is_object_url(str(path)):
        try:
            return None if storage.is_file(str(path)) else f"{key}: {path}: object not found"
        except WitError as e:
            return f"{key}: {e}"
    p = Path(path)
    return None if (p.is_file() if kind == "file" else p.is_dir()) else f"{key}: {path}: {kind} not found"


@cache
def recipe_model() -> type[Recipe]:
    """The Recipe model of the installed stages: `[run]` and one section per stage with settings,
    optional stages' sections defaulting to absent."""
    from .stage import registered

    fields = {}
    for s in registered():
        if s.settings is not None:
            fields[s.name] = (s.settings | None, None) if s.optional else (s.settings, s.settings())
    return create_model("Recipe", __base__=Recipe, **fields)


def load_recipe(path: str | os.PathLike, overrides: dict | None = None) -> Recipe:
    """Read and validate a recipe; every problem names the file and the key."""
    text = None
    if storage.is_object_url(str(path)):  # a run folder's recipe.toml in a store
        try:
            text = storage.read_bytes(str(path))
        except FileNotFoundError:
            raise WitError("recipe file not found", where=str(path)) from None
    path = Path(path)
    try:
        raw = tomllib.loads((text if text is not None else path.read_bytes()).decode("utf-8"))
    except FileNotFoundError:
        raise WitError("recipe file not found", where=str(path)) from None
    except UnicodeDecodeError as e:
        raise WitError(f"not UTF-8 text (byte {e.start})", where=str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise WitError(f"not valid TOML: {e}", where=str(path)) from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})[key] = value
    raw["base_dir"] = str(path.resolve().parent) if text is None else "."
    try:
        return recipe_model().model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key" + _allowed_keys(err["loc"])
            problems.append(f"  {key}: {msg} (got {err.get('input')!r})")
        raise WitError("invalid recipe:\n" + "\n".join(problems), where=str(path)) from None


def _allowed_keys(loc: tuple) -> str:
    model: type[BaseModel] = recipe_model()
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return ""
        # An optional section is `Section | None`: look through the None.
        models = [t for t in (get_args(field.annotation) or (field.annotation,))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if not models:
            return ""
        model = models[0]
    names = [n for n, f in model.model_fields.items() if not f.exclude]
    return "; allowed: " + ", ".join(names)

