"""The stage runner: plan partitions, skip the complete ones, run the rest on a local process pool or
on Ray, then reduce.

A stage is a list of `Task`s, each a top-level function over one partition that writes its own output
files atomically. Nothing is shared in memory, which is what makes the local pool and a Ray cluster
interchangeable: both call the same `execute` on the same task and produce the same bytes.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from .errors import WitError
from .ids import fingerprint
from .workspace import Run, write_marker

log = logging.getLogger("wit")


@dataclass(frozen=True)
class Task:
    """One partition of one stage. `func(**kwargs)` writes `outputs` and returns a small info dict."""

    stage: str
    key: str
    func: Callable[..., dict]
    kwargs: dict
    outputs: list[str]
    marker: str
    # Everything that decides the outputs: settings, input identities, upstream fingerprints.
    inputs: dict = field(default_factory=dict)
    weight: int = 1  # e.g. input bytes, for the progress bar

    @property
    def fingerprint(self) -> str:
        return fingerprint({"stage": self.stage, "key": self.key, "inputs": self.inputs})


def is_complete(task: Task) -> bool:
    import json

    try:
        marker = json.loads(Path(task.marker).read_text())
    except (FileNotFoundError, ValueError):
        return False
    return marker.get("fingerprint") == task.fingerprint and all(
        os.path.exists(p) for p in task.outputs
    )


def execute(task: Task) -> dict:
    """Run one task and write its marker last. Runs inside a worker process or a Ray task."""
    info = task.func(**task.kwargs) or {}
    write_marker(task.marker, task.fingerprint, task.outputs, info)
    return info


class Stage:
    """A stage: `tasks` are the per-partition map; `reduce_task`, if any, runs after all of them."""

    name: str = ""

    def tasks(self, run: Run) -> list[Task]:
        raise NotImplementedError

    def reduce_task(self, run: Run, tasks: list[Task]) -> Task | None:
        return None


# ---------------------------------------------------------------------------------------------------
# Executors


class LocalExecutor:
    """A process pool; with one worker, tasks run in this process (easy to debug and profile)."""

    def __init__(self, workers: int):
        self.workers = workers

    def map(self, tasks: list[Task]) -> Iterator[tuple[Task, dict | BaseException]]:
        if self.workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                try:
                    yield task, execute(task)
                except Exception as e:  # reported per partition by run_stage
                    yield task, e
            return
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(min(self.workers, len(tasks)), mp_context=ctx) as pool:
            futures = {pool.submit(execute, t): t for t in tasks}
            for fut in cf.as_completed(futures):
                try:
                    yield futures[fut], fut.result()
                except Exception as e:
                    yield futures[fut], e

    def close(self) -> None:
        pass


class RayExecutor:
    """The same tasks as Ray tasks. Workers must see the run folder at the same path (shared FS)."""

    def __init__(self, workers: int, address: str = ""):
        try:
            import ray
        except ImportError:
            raise WitError(
                "executor = 'ray' needs Ray: pip install 'wit-builder[ray]'", where="recipe run.executor"
            ) from None
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        self.ray = ray
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=True)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=True)
        # A task that raised is a bad partition, not a lost worker: do not retry it.
        self.remote = ray.remote(num_cpus=1, max_retries=0)(execute)

    def map(self, tasks: list[Task]) -> Iterator[tuple[Task, dict | BaseException]]:
        ray = self.ray
        pending = {self.remote.remote(t): t for t in tasks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            task = pending.pop(ref)
            try:
                yield task, ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                yield task, getattr(e, "cause", None) or e
            except Exception as e:
                yield task, e

    def close(self) -> None:
        pass


def make_executor(run: Run):
    settings = run.recipe.run
    if settings.executor == "ray":
        return RayExecutor(settings.workers, settings.ray_address)
    return LocalExecutor(settings.workers)


# ---------------------------------------------------------------------------------------------------


def remove_stale_temporaries(tasks: list[Task]) -> int:
    """Temporary files that a killed run left beside the outputs (`.name.tmp-PID`). They were never
    renamed into place, so nothing reads them; one run at a time owns a run folder."""
    removed = 0
    for folder in {Path(p).parent for t in tasks for p in t.outputs}:
        for tmp in folder.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def run_stage(stage: Stage, run: Run, executor, force: bool = False) -> dict:
    """Run a stage to completion. Returns counts; raises WitError naming every failed partition."""
    tasks = stage.tasks(run)
    reduce = stage.reduce_task(run, tasks)
    if removed := remove_stale_temporaries(tasks + ([reduce] if reduce else [])):
        log.info("%s: removed %d temporary files left by an interrupted run", stage.name, removed)
    pending = [t for t in tasks if force or not is_complete(t)]
    skipped = len(tasks) - len(pending)
    log.info("%s: %d partitions, %d already complete, %d to run", stage.name, len(tasks), skipped,
             len(pending))
    failures: list[tuple[Task, BaseException]] = []
    if pending:
        bar = tqdm(total=sum(t.weight for t in pending), desc=stage.name, unit="B", unit_scale=True,
                   disable=None, dynamic_ncols=True)
        for task, result in executor.map(pending):
            bar.update(task.weight)
            if isinstance(result, BaseException):
                failures.append((task, result))
                log.error("%s/%s failed: %s", stage.name, task.key, result)
                log.debug("".join(traceback.format_exception(result)))
        bar.close()
    if failures:
        lines = "\n".join(f"  {t.key}: {e}" for t, e in failures)
        raise WitError(
            f"{len(failures)} of {len(tasks)} partitions failed; the {len(tasks) - len(failures)} "
            f"others are complete and kept. Fix the input and rerun to do only the failed ones:\n{lines}",
            where=f"stage {stage.name}",
        )
    if reduce is not None and (force or not is_complete(reduce)):
        log.info("%s: reduce", stage.name)
        execute(reduce)
    return {"partitions": len(tasks), "ran": len(pending), "skipped": skipped}
