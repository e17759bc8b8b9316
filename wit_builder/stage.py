"""The stage contract, and how the core finds the stages.

A stage is a class registered under the package entry point group `wit_builder.stages`; the core
imports none by name. It declares:

- `needs`: the stages whose manifests it plans from (and so runs after);
- `settings`: its recipe section `[name]`, a `Section` model (strict: a misspelt key is an error);
- `provides`: the files each of its partitions has, by name, with their parquet schema (checked
  against the first partition's files when the stage completes, so a wrong column fails there, not
  three stages later);
- `views`: the DuckDB views over its files, and `main_view`, the one `wit status` counts;
- `funnel`: SQL over its views giving (step, reason, rows): the stage's rows in the funnel view;
- `kept`: (label, SQL) of the rows it passes on, for the report's funnel plot;
- `check_inputs`: the recipe's input paths it reads that are missing, before anything runs.

A stage may `refine` another: it provides that stage's files under the same names (a CLIP-score or
NSFW gate writes the dedup decisions again with more rows dropped) and every later stage that needs
the refined stage reads the refiner's partitions instead. A stage with `optional = True` runs only in
recipes that have its section, so installing a package of stages changes no other recipe.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points

import pyarrow as pa

from .errors import WitError
from .recipe import Recipe, Section, check_paths
from .runner import Manifest, Part, Task, partition_entry, read_manifest
from .workspace import Run

GROUP = "wit_builder.stages"


@dataclass(frozen=True)
class View:
    """A DuckDB view: `files` is a glob under the run folder."""

    name: str
    files: str


@dataclass(frozen=True)
class Plot:
    """One figure of the report: `draw(con)` returns a matplotlib figure, or None when there is
    nothing to draw; it runs only when every view in `needs_views` exists."""

    title: str
    name: str
    draw: Callable
    needs_views: tuple[str, ...] = ()


class Stage:
    name: str = ""
    needs: tuple[str, ...] = ()
    settings: type[Section] | None = None
    optional: bool = False
    refines: str = ""
    provides: dict[str, pa.Schema | None] = {}
    views: tuple[View, ...] = ()
    main_view: str = ""
    funnel: str = ""
    kept: tuple[str, str] = ("", "")
    plots: tuple[Plot, ...] = ()
    unit: str = "B"  # of its tasks' weights, for the progress bar

    # --- planning ---------------------------------------------------------------------------------

    def plan(self, run: Run) -> Iterator[list[Task]]:
        """A generator: yields the tasks of each step in turn (the runner completes one step before
        asking for the next, so a later step can plan from an earlier step's markers) and returns
        the stage's Manifest. The default runs `tasks`, then `reduce_task` if there is one."""
        tasks = self.tasks(run)
        yield tasks
        reduce = self.reduce_task(run, tasks)
        if reduce is not None:
            yield [reduce]
        return Manifest(self.name, [partition_entry(t, {"outputs": t.outputs}) for t in tasks],
                        {"reduce": reduce.outputs} if reduce else {})

    def tasks(self, run: Run) -> list[Task]:
        raise NotImplementedError

    def reduce_task(self, run: Run, tasks: list[Task]) -> Task | None:
        return None

    def task(self, run: Run, key: str, func: Callable[..., dict], **fields) -> Task:
        """A task of this stage; its marker goes where the runner looks for it."""
        return Task(stage=self.name, key=key, func=func, state=str(run.state_dir), **fields)

    def needed(self, run: Run, stage: str) -> Manifest:
        """The manifest this stage reads for `stage`: that stage's, or the last refiner's of it
        that runs before this one."""
        if stage not in self.needs:
            raise WitError(f"reads the {stage} stage without declaring it in `needs`", where=f"stage {self.name}")
        source = pipeline(run.recipe).source_of(stage, self.name)
        return read_manifest(run, source, needed_by=self.name)

    def parts(self, run: Run, stage: str) -> list[Part]:
        """The partitions of a needed stage."""
        return self.needed(run, stage).parts()

    def section(self, recipe: Recipe):
        """This stage's recipe section (None for an optional stage the recipe leaves out)."""
        return getattr(recipe, self.name, None) if self.settings else None

    def check_inputs(self, recipe: Recipe) -> list[str]:
        """Every input path of this stage's section that does not exist, as `key: path` lines; the
        section's fields that are paths say so (`input_path`)."""
        section = self.section(recipe)
        return check_paths(recipe, self.name, section) if section is not None else []

    def empty_hint(self, probe) -> str | None:
        """Why a run that made no shards ran dry here, or None if rows passed this stage."""
        return None

    def expects_rows(self, recipe: Recipe) -> bool:
        """Whether this recipe asks this stage for rows (a recipe without inputs builds a query
        list only, and an empty corpus is then no error)."""
        return True


# --- discovery ------------------------------------------------------------------------------------


@cache
def registered() -> tuple[Stage, ...]:
    """Every installed stage, in data-flow order."""
    found: dict[str, Stage] = {}
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
        except Exception as e:  # a broken plugin names itself, not a traceback from importlib
            raise WitError(f"cannot load stage {ep.name!r} ({ep.value}): {type(e).__name__}: {e}",
                           where=f"entry point {GROUP}") from None
        stage = cls() if isinstance(cls, type) else cls
        if stage.name != ep.name:
            raise WitError(f"entry point {ep.name!r} loads a stage named {stage.name!r}", where=ep.value)
        if ep.name in found:
            continue  # the same distribution seen twice on the path
        found[ep.name] = stage
    return tuple(data_flow_order(list(found.values())))


def data_flow_order(stages: list[Stage]) -> list[Stage]:
    """Each stage after what it needs, in the order it names them, and the refiners of a stage right
    after it (so before every stage that needs it)."""
    by_name = {s.name: s for s in stages}
    refiners = {s.name: [r for r in stages if r.refines == s.name] for s in stages}
    order: list[Stage] = []
    state: dict[str, str] = {}

    def visit(name: str, wanted_by: str) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise WitError(f"the stages' needs form a cycle through {name!r}", where=f"entry points {GROUP}")
        if name not in by_name:
            raise WitError(f"needs the stage {name!r}, which is not installed", where=f"stage {wanted_by}")
        stage = by_name[name]
        state[name] = "visiting"
        for needed in ((stage.refines,) if stage.refines else ()) + stage.needs:
            visit(needed, name)
        state[name] = "done"
        order.append(stage)
        for r in refiners[name]:
            if state.get(r.name) != "visiting":  # else it is placed when its own visit ends
                visit(r.name, name)

    for s in stages:
        visit(s.name, s.name)
    return order


@dataclass
class Pipeline:
    """The stages a recipe runs, in order: every installed one, less the optional stages whose
    section the recipe leaves out."""

    stages: list[Stage] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def __getitem__(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def source_of(self, stage: str, reader: str) -> str:
        """Which stage's manifest `reader` reads for `stage`: the last refiner of it before the
        reader, or the stage itself."""
        source = stage
        for s in self.stages:
            if s.name == reader:
                break
            if s.refines == stage:
                source = s.name
        return source


def pipeline(recipe: Recipe) -> Pipeline:
    chosen = [s for s in registered() if not (s.optional and s.section(recipe) is None)]
    names = {s.name for s in chosen}
    for s in chosen:
        for n in s.needs:
            if n not in names:
                raise WitError(f"the {s.name} stage needs the {n} stage, which this recipe leaves out",
                               where=f"recipe [{n}]")
    return Pipeline(chosen)


def all_views() -> list[View]:
    """The views of every installed stage (a view exists in a run once its files do)."""
    return [v for s in registered() for v in s.views]


def funnel_sql(existing: set[str]) -> str:
    """The funnel view: each stage's (step, reason, rows) in data-flow order, for the stages whose
    views exist in this run."""
    parts = []
    for position, s in enumerate(registered(), 1):
        if s.funnel and set(views_named(s.funnel)) <= existing:
            parts.append(f"SELECT {position} AS position, step::VARCHAR AS step, reason::VARCHAR AS reason, "
                         f"rows::BIGINT AS rows FROM ({s.funnel.strip()})")
    return " UNION ALL ".join(parts)


def views_named(query: str) -> list[str]:
    """The views of installed stages that a query names."""
    return [v.name for v in all_views() if re.search(rf"\b{re.escape(v.name)}\b", query)]


def check_provides(stage: Stage, manifest: Manifest) -> None:
    """The first partition's declared files against their declared schemas: one footer read per
    file name, however many partitions; a missing column fails here, naming the file."""
    from . import workspace

    parts = manifest.parts()
    if not parts or not stage.provides:
        return
    first = parts[0]
    for name, schema in stage.provides.items():
        path = first.file(name)
        if schema is None:
            continue
        try:
            found = workspace.parquet_file(path).schema_arrow
        except Exception as e:
            raise WitError(f"declared file {name!r} is not readable parquet: {e}", where=path) from None
        missing = [f"{f.name} {f.type}" for f in schema if found.get_field_index(f.name) < 0
                   or not same_type(found.field(f.name).type, f.type)]
        if missing:
            raise WitError(f"file {name!r} lacks the declared columns: {', '.join(missing)}", where=path)


def same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """Equal types, a list's item name aside (parquet names it `element`, Arrow `item`)."""
    if pa.types.is_list(a) and pa.types.is_list(b):
        return same_type(a.value_type, b.value_type)
    return a.equals(b)
