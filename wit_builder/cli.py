"""The `wit` command line: run a recipe, see where a run stands, and ask it questions in SQL."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .errors import WitError

log = logging.getLogger("wit")
COMMANDS = "wit_builder.commands"  # entry point group of the commands other packages add


class _TqdmHandler(logging.StreamHandler):
    """Console logging that does not tear through progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        from . import runner

        tqdm.write(self.format(record), file=runner.CONSOLE)


def _setup_logging(run_dir: Path | None, verbose: bool) -> None:
    from . import runner

    if runner.CONSOLE is sys.stderr:  # a private copy of the terminal: see runner.CONSOLE
        runner.CONSOLE = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding="utf-8",
                                   errors="replace")
    log.setLevel(logging.DEBUG)
    log.handlers.clear()
    console = _TqdmHandler()
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "wit.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file)


def _recipe_of(run: str, overrides: dict | None = None):
    """The recipe of a run folder (its saved recipe.toml, run where the folder is now: a copied or
    moved run carries on in its new place) or of a recipe file."""
    from . import storage
    from .recipe import load_recipe

    if storage.is_object_url(str(run)):  # a run folder in a store: its saved recipe, run there
        url = str(run).rstrip("/")
        if not storage.exists(url + "/recipe.toml"):  # a store's own trouble is named here
            raise WitError("no run here: expected a run folder with recipe.toml", where=url)
        recipe = load_recipe(url + "/recipe.toml", overrides)
        root, _, name = url.rpartition("/")
        return recipe.model_copy(update={"run": recipe.run.model_copy(update={"root": root, "name": name})})
    path = Path(run)
    recipe_file = path / "recipe.toml" if path.is_dir() else path
    if not recipe_file.exists():
        raise WitError("no run here: expected a run folder with recipe.toml, or a recipe file",
                       where=str(path))
    recipe = load_recipe(recipe_file, overrides)
    if path.is_dir():
        recipe = recipe.model_copy(update={"run": recipe.run.model_copy(
            update={"root": str(path.resolve().parent), "name": path.resolve().name})})
    return recipe


def _load_run(run: str):
    """A run folder or a recipe file, as a Run."""
    from .workspace import Run

    return Run(_recipe_of(run))


def cmd_run(args) -> int:
    from .runner import make_executor, read_manifest, run_stage
    from .stage import pipeline
    from .workspace import Run, run_lock

    overrides = {}
    if args.workers is not None:
        overrides["run.workers"] = args.workers
    if args.executor:
        overrides["run.executor"] = args.executor
    recipe = _recipe_of(args.recipe, overrides)
    run = Run(recipe)
    _setup_logging(run.dir, args.verbose)
    stages = pipeline(recipe)
    chosen = args.stage or stages.names
    for name in chosen:
        if name not in stages.names:
            raise WitError(f"unknown stage {name!r}; stages: {', '.join(stages.names)}", where="--stage")
    if missing := recipe.missing_inputs(chosen):
        raise WitError("inputs not found:\n" + "\n".join(f"  {m}" for m in missing), where=str(args.recipe))
    with run_lock(run.dir):
        run.save_recipe()
        log.info("run %s -> %s (%s executor, %d workers)", recipe.run.name, run.place,
                 recipe.run.executor, recipe.run.workers)
        executor = make_executor(run)
        try:
            for name in chosen:
                run_stage(stages[name], run, executor, force=args.force)
        finally:
            executor.close()
    # A recipe with pairs to find must end in shards (one without inputs builds a query list only).
    last = stages.names[-1]
    if last in chosen and all(s.expects_rows(recipe) for s in stages.stages) and not read_manifest(run, last).partitions:
        raise WitError(f"the run made no {last}: {why_empty(run)}", where=run.place)
    log.info("done. Query it: wit sql %s \"SELECT * FROM queries LIMIT 10\"", run.place)
    return 0


def why_empty(run) -> str:
    """Where the funnel ran dry, with the top reasons: the first stage, in data-flow order, that
    says nothing passed it."""
    from . import sql
    from .stage import pipeline

    probe = sql.Probe(sql.connect(run.dir))
    for stage in pipeline(run.recipe).stages:
        if hint := stage.empty_hint(probe):
            return hint
    return "no stage reports where the rows went; see wit sql RUN \"SELECT * FROM funnel\""


def cmd_status(args) -> int:
    from . import workspace
    from .runner import read_manifest, read_markers
    from .stage import pipeline

    run = _load_run(args.run)
    print(f"run {run.place}")
    for stage in pipeline(run.recipe).stages:
        name = stage.name
        try:
            manifest = read_manifest(run, name)
            line = f"  {name:<12} complete: {len(manifest.partitions)} partitions"
        except WitError:
            try:
                tasks = next(stage.plan(run))
            except WitError as e:
                print(f"  {name:<12} cannot plan yet: {e}")
                continue
            except StopIteration:
                tasks = []
            done = sum(m is not None for m in read_markers(tasks))
            line = f"  {name:<12} {done}/{len(tasks)} partitions done"
        for view in stage.views:
            if view.name == stage.main_view:
                folder, _, files = view.files.rpartition("/")
                found = workspace.glob(run.dir / folder, files)
                rows = sum(workspace.parquet_file(p).metadata.num_rows for p in found)
                line += f"; {view.name}: {rows:,} rows"
        print(line)
    return 0


def cmd_sql(args) -> int:
    from . import sql

    run = _load_run(args.run)
    con = sql.connect(run.dir)
    if not args.query:
        return _interactive(con)
    try:
        rel = con.sql(args.query)
    except Exception as e:  # duckdb's own errors are already clear; say which views exist
        raise WitError(f"{e}\nviews: {', '.join(sql.views(con)) or '(none yet)'}",
                       where="wit sql") from None
    if rel is None:
        return 0
    if args.csv:
        rel.to_df().to_csv(sys.stdout, index=False)
    elif args.json:
        print(rel.to_df().to_json(orient="records", lines=True, force_ascii=False), end="")
    elif args.parquet:
        rel.write_parquet(args.parquet)
        print(f"wrote {args.parquet}")
    else:
        rel.show(max_rows=args.max_rows, max_width=200)
    return 0


def cmd_stats(args) -> int:
    from . import stats

    run = _load_run(args.run)
    extra = [Path(d) for d in args.reports or []]
    for title, result in stats.run_reports(run.dir, extra):
        if args.json:
            rows = [] if isinstance(result, str) else [dict(zip(result.columns, r)) for r in result.fetchall()]
            print(json.dumps({"title": title, "rows": rows, "note": result if isinstance(result, str) else None},
                             default=str))
        elif isinstance(result, str):
            print(f"\n== {title}\n   ({result})")
        else:
            print(f"\n== {title}")
            result.show(max_width=160, max_rows=40)
    return 0


def cmd_report(args) -> int:
    from .report import write_report
    from .workspace import location

    run = _load_run(args.run)
    path = write_report(run.dir, Path(args.output) if args.output else None)
    print(f"report: {location(path)}")
    return 0


def _interactive(con) -> int:
    from . import sql

    print(f"DuckDB on this run; views: {', '.join(sql.views(con))}. End a statement with ';', "
          "quit with Ctrl-D.")
    buf = ""
    while True:
        try:
            line = input("wit> " if not buf else "...> ")
        except EOFError:
            print()
            return 0
        buf += line + "\n"
        if buf.strip().endswith(";"):
            try:
                rel = con.sql(buf)
                if rel is not None:
                    rel.show(max_width=200)
            except Exception as e:
                print(e)
            buf = ""


def command_summary(ep) -> str:
    """The first line of a command's module docstring, read without importing the module (a
    trainer's imports take seconds)."""
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec(ep.module)
        doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) if spec and spec.origin else None
    except (ImportError, OSError, SyntaxError, ValueError):
        doc = None
    return (doc or ep.value).strip().splitlines()[0].rstrip(".")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Commands of other packages (`wit train`, `wit eval`) parse their own options; their imports
    # (torch, open_clip) load only when they run.
    commands = {ep.name: ep for ep in entry_points(group=COMMANDS)}
    if argv and argv[0] in commands:
        return commands[argv[0]].load()(argv[1:])
    parser = argparse.ArgumentParser(prog="wit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe's stages (all, or those named with --stage)")
    p.add_argument("recipe")
    p.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    p.add_argument("--force", action="store_true", help="redo partitions that are already complete")
    p.add_argument("--workers", type=int, help="override run.workers")
    p.add_argument("--executor", choices=["local", "ray"], help="override run.executor")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="partitions done and pending, per stage")
    p.add_argument("run", help="a run folder (runs/NAME) or its recipe")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sql", help="DuckDB SQL over a run's stage views")
    p.add_argument("run", help="a run folder (runs/NAME) or its recipe")
    p.add_argument("query", nargs="?", help="omit for an interactive prompt")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true")
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--parquet", metavar="FILE")
    p.add_argument("--max-rows", type=int, default=40)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("stats", help="the built-in reports (and your own .sql files) over a run")
    p.add_argument("run", help="a run folder (runs/NAME) or its recipe")
    p.add_argument("--reports", action="append", help="a folder of extra .sql reports (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per report")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("report", help="write a self-contained report.html with plots")
    p.add_argument("run", help="a run folder (runs/NAME) or its recipe")
    p.add_argument("-o", "--output", help="default: RUN/report.html")
    p.set_defaults(func=cmd_report)

    for name, ep in sorted(commands.items()):
        sub.add_parser(name, help=f"{command_summary(ep)} (wit {name} --help)", add_help=False)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader stopped early (`wit status RUN | head -1`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except WitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed partitions are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
