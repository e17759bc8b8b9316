"""The stage runner: plan a stage's steps, skip the complete tasks, run the rest on a local process
pool or on Ray, and write the stage's manifest.

A stage (wit_builder/stage.py) is a sequence of steps; a step is a list of `Task`s, each a top-level
function over one partition (or one shuffle bucket) that writes its own output files atomically.
Nothing is shared in memory, which is what makes the local pool and a Ray cluster interchangeable:
both call the same `execute` on the same task and produce the same bytes.

A stage plans from the manifests of the stages it needs (`_state/<stage>/_manifest.json`, written
when a stage completes: its partitions, their files and fingerprints), never by re-planning the
stages above it, so the driver holds O(partitions), never samples.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import workspace
from .errors import WitError
from .ids import fingerprint
from .workspace import Run, atomic_write_bytes, io_counters, write_marker

log = logging.getLogger("wit")
# Where the console log and the progress bars go. The command line points it at a private copy of
# the terminal's stderr, so that a task that sends the process's own stderr to a file (the download
# stage, for img2dataset's log) does not swallow them.
CONSOLE = sys.stderr


@dataclass(frozen=True)
class Task:
    """One partition of one stage. `func(**kwargs)` writes `outputs` and returns a small info dict."""

    stage: str
    key: str
    func: Callable[..., dict]
    kwargs: dict
    outputs: list[str]
    state: str  # the run's `_state` folder: the marker is `state/stage/key.json`
    # Everything that decides the outputs: settings, input identities, upstream fingerprints.
    inputs: dict = field(default_factory=dict)
    weight: int = 1  # e.g. input bytes, for the progress bar
    # For a task whose outputs are not known in advance (a shuffle map writes the buckets it has rows
    # for): an empty file written after it succeeds, inside the shuffle's folder, so that deleting
    # the folder also makes the task incomplete.
    receipt: str = ""
    # A folder where the task keeps resumable work in progress; `--force` deletes it first.
    work: str = ""
    # A JSON file the task rewrites while it runs ({"done", "ok", "failures": {reason: n}}, in units
    # of its weight), so the driver's bar and log move before the task ends.
    progress: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint({"stage": self.stage, "key": self.key, "inputs": self.inputs})

    @property
    def marker(self) -> str:
        return f"{self.state}/{self.stage}/{self.key}.json"


def read_markers(tasks: list[Task]) -> list[dict | None]:
    """Each task's marker where the task is complete (its fingerprint matches and its outputs are in
    place), else None; for a run in a store the markers are fetched together."""
    bodies = workspace.read_many([t.marker for t in tasks])
    return [valid_marker(t, bodies.get(t.marker)) for t in tasks]


def valid_marker(task: Task, body: bytes | None) -> dict | None:
    try:
        marker = json.loads(body) if body is not None else None
    except ValueError:
        return None
    outputs = task.outputs + ([task.receipt] if task.receipt else [])
    if not marker or marker.get("fingerprint") != task.fingerprint or not all(in_place(p) for p in outputs):
        return None
    return marker


def in_place(path: str) -> bool:
    """Whether an output named by a marker is there. In a store the marker alone says so: it is put
    after its outputs, and checking each one would cost a request per file."""
    return bool(workspace.in_store(path)) or os.path.exists(path)


def execute(task: Task) -> dict:
    """Run one task and write its marker last. Runs inside a worker process or a Ray task. The marker
    records what the task cost: bytes read and written, files opened, and its peak memory."""
    with io_counters() as cost:
        info = task.func(**task.kwargs) or {}
    if task.receipt:
        atomic_write_bytes(task.receipt, b"")
    info = {**info, "cost": cost}
    write_marker(task.marker, task.fingerprint, task.outputs, info)
    return info


@dataclass(frozen=True)
class Part:
    """One partition of a completed stage, as the stages that need it read it: its files by name
    (its own and those of the stages above that it aligns with), fingerprint and info."""

    stage: str
    key: str
    fingerprint: str
    files: dict
    info: dict

    def file(self, name: str):
        try:
            return self.files[name]
        except KeyError:
            raise WitError(f"partition {self.key} has no file {name!r} (it has: {', '.join(self.files)})",
                           where=f"stage {self.stage}") from None

    def entry(self, task: Task, own: dict, info: dict | None = None) -> dict:
        """The manifest row of `task`, the stage's own task over this partition: this partition's
        files carried forward, with the task's own added."""
        return partition_entry(task, {**self.files, **own}, info, key=self.key)


@dataclass
class Manifest:
    """A completed stage: its partitions (key, fingerprint, files, info) in data-flow order, and the
    stage-wide outputs (e.g. summed counts). What the next stage plans from."""

    stage: str
    partitions: list[dict]
    outputs: dict = field(default_factory=dict)
    fingerprint: str = ""
    # The fingerprint of the stage's plan (its inputs and settings): a rerun with the same plan and
    # every file in place is complete without replanning its steps.
    plan: str = ""
    # Intermediate folders (shuffle buckets) deleted once the manifest is written.
    scratch: list[str] = field(default_factory=list)

    def to_json(self, run_dir: Path) -> bytes:
        """The manifest's file, naming run files relative to the run folder (`$RUN/...`): a run
        carried on from another place (another disk, another machine's staging folder) reads it."""
        body = {"stage": self.stage, "fingerprint": self.fingerprint, "outputs": self.outputs,
                "partitions": self.partitions, "plan": self.plan}
        return json.dumps(within(run_dir, body, RUN_FOLDER), indent=1, sort_keys=True).encode()

    def parts(self) -> list[Part]:
        return [Part(self.stage, p["key"], p["fingerprint"], p["files"], p["info"]) for p in self.partitions]

    def output(self, name: str):
        """A stage-wide output by name; a clear error naming the stage when it has none."""
        try:
            return self.outputs[name]
        except KeyError:
            raise WitError(f"the {self.stage} stage's manifest has no output {name!r} (it has: "
                           f"{', '.join(self.outputs) or 'none'})", where=f"stage {self.stage}") from None

    def files(self) -> list[str]:
        found = []
        paths = [v for k, v in self.outputs.items() if not k.endswith("fingerprint")]
        for value in [v for p in self.partitions for v in p["files"].values()] + paths:
            found += value if isinstance(value, list) else [value] if isinstance(value, str) else []
        return found


def manifest_path(run: Run, stage: str) -> Path:
    return run.dir / "_state" / stage / "_manifest.json"


def read_manifest(run: Run, stage: str, needed_by: str = "") -> Manifest:
    """The completed manifest of `stage`; a clear error when that stage has not completed yet."""
    try:
        body = in_run(run.dir, json.loads(workspace.read_bytes(manifest_path(run, stage))))
    except (FileNotFoundError, ValueError):
        raise WitError(f"the {stage} stage has not completed yet: run it first "
                       f"(wit run RECIPE --stage {stage})", where=f"stage {needed_by or stage}") from None
    return Manifest(body["stage"], body["partitions"], body.get("outputs", {}), body["fingerprint"],
                    body.get("plan", ""))


def completed(run: Run, stage: str, plan: str) -> Manifest | None:
    """The stage's manifest if it was written for this same plan and its files are all in place."""
    try:
        manifest = read_manifest(run, stage)
    except WitError:
        return None
    if manifest.plan != plan or not all(in_place(f) for f in manifest.files()):
        return None
    log.info("%s: complete (%d partitions)", stage, len(manifest.partitions))
    return manifest


def partition_entry(task: Task, files: dict, info: dict | None = None, key: str = "") -> dict:
    """A manifest row for a completed per-partition task. `files` carries forward what later stages
    read of this partition (its own outputs and the upstream files it aligns with)."""
    return {"key": key or task.key, "fingerprint": task.fingerprint, "files": files, "info": info or {}}


def step_info(tasks: list[Task]) -> list[dict]:
    """The infos of a completed step's tasks, in task order (from their markers)."""
    infos = read_markers(tasks)
    for t, marker in zip(tasks, infos):
        if marker is None:
            raise WitError(f"task {t.key} has no valid marker after it ran", where=f"stage {t.stage}")
    return infos


def combined_fingerprint(tasks: list[Task]) -> str:
    """One fingerprint for a whole step: what a later step depends on, without listing every task."""
    return fingerprint([t.fingerprint for t in tasks])


# ---------------------------------------------------------------------------------------------------
# Executors


def die_with_parent(parent: int) -> None:
    """A child process's first act: ask the kernel for SIGKILL when `parent` dies (kill -9 included),
    and exit at once if it is already gone, so that no child of a killed process lives on. Strictly,
    the signal comes when the parent's thread that started the child ends: start children from a
    thread that lasts. Linux only (prctl PR_SET_PDEATHSIG); elsewhere children outlive a killed parent."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def start_worker(driver: int, stores: dict[str, str]) -> None:
    """A pool worker's first acts: learn where the run's store is (see workspace), and die with the
    driver, so that no orphan finishes a task into a run folder a rerun now owns, or idles on for ever."""
    for staging, url in stores.items():
        workspace.use_store(staging, url)
    die_with_parent(driver)


class Window:
    """At most `size` of `tasks` in flight: submits more as each finishes, so a step of 100,000 tasks
    holds a few handles at a time, not 100,000. `submit(task)` returns a handle; `wait(handles)`
    returns the finished ones (at least one). `started(task)` is told of each task as it goes out."""

    def __init__(self, tasks: list[Task], size: int, submit, wait, started=None):
        self.queue = collections.deque(tasks)
        self.size, self.submit, self.wait, self.started = max(size, 1), submit, wait, started
        self.running: dict = {}

    def again(self, task: Task) -> None:
        """Run `task` once more (it was lost, not failed): first in line."""
        self.queue.appendleft(task)

    def __iter__(self) -> Iterator[tuple[Task, object]]:
        while self.queue or self.running:
            while self.queue and len(self.running) < self.size:
                task = self.queue.popleft()
                if self.started:
                    self.started(task)
                self.running[self.submit(task)] = task
            for handle in self.wait(list(self.running)):
                yield self.running.pop(handle), handle


class LocalExecutor:
    """A process pool; with one worker, tasks run in this process (easy to debug and profile)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None

    def map(self, tasks: list[Task], started=None) -> Iterator[tuple[Task, dict | BaseException]]:
        # With workers, even a lone task (a reduce) runs in a worker: the driver holds no samples.
        if self.workers <= 1:
            for task in tasks:
                if started:
                    started(task)
                try:
                    yield task, execute(task)
                except Exception as e:  # reported per partition by run_stage
                    yield task, e
            return
        if self._pool is None:  # one pool for every step of the run: workers start once
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=start_worker,
                                                initargs=(os.getpid(), workspace.stores()))
        window = Window(tasks, 2 * self.workers, lambda t: self._pool.submit(execute, t),
                        lambda futures: cf.wait(futures, return_when=cf.FIRST_COMPLETED).done, started)
        for task, future in window:
            try:
                yield task, future.result()
            except Exception as e:
                yield task, e

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def execute_in(stores: dict[str, str], task: Task) -> dict:
    """`execute` on a Ray worker, which learns first where the run's store is."""
    for staging, url in stores.items():
        workspace.use_store(staging, url)
    return execute(task)


class RayExecutor:
    """The same tasks as Ray tasks. The workers see the run folder at the same path (a shared
    filesystem), or the run is in an object store and no node needs another's disk.

    A task that raised is a bad partition and is not retried. A task lost with its worker or its
    node is run again, up to `retries` times: tasks are idempotent (their outputs appear whole, the
    marker last), so the step still gives the same bytes."""

    def __init__(self, workers: int, address: str = "", retries: int = 3):
        try:
            import ray
        except ImportError:
            raise WitError(
                "executor = 'ray' needs Ray: pip install 'wit-builder[ray]'", where="recipe run.executor"
            ) from None
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        self.ray, self.workers, self.retries = ray, workers, retries
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=True)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=True)
        # Retries are ours (see map), so that a raised error is never retried and a lost task is.
        self.remote = ray.remote(num_cpus=1, max_retries=0)(execute_in)

    def in_flight(self) -> int:
        """Tasks submitted at once: twice the cluster's CPUs, so no CPU waits while the driver
        hands out the next task, and the driver holds a few thousand handles at most."""
        cpus = int(self.ray.cluster_resources().get("CPU", 0))
        return 2 * max(cpus, self.workers, 1)

    def _finished(self, refs: list) -> list:
        # One blocking wait for the first, then everything else already done, in one call.
        done, rest = self.ray.wait(refs, num_returns=1)
        if rest:
            done += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return done

    def map(self, tasks: list[Task], started=None) -> Iterator[tuple[Task, dict | BaseException]]:
        ray = self.ray
        stores = workspace.stores()
        lost: collections.Counter = collections.Counter()
        window = Window(tasks, self.in_flight(), lambda t: self.remote.remote(stores, t), self._finished, started)
        for task, ref in window:
            try:
                yield task, ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the task itself raised
                yield task, getattr(e, "cause", None) or e
            except ray.exceptions.RayError as e:  # its worker process or node died under it
                lost[task.key] += 1
                if lost[task.key] > self.retries:
                    yield task, WitError(f"lost with its worker or node {lost[task.key]} times (run.task_retries "
                                         f"= {self.retries}): {e}", where=f"task {task.key}")
                    continue
                log.warning("%s/%s: lost with its worker or node (%s); running it again (%d of %d)", task.stage,
                            task.key, type(e).__name__, lost[task.key], self.retries)
                window.again(task)
            except Exception as e:
                yield task, e

    def close(self) -> None:
        pass


def make_executor(run: Run):
    settings = run.recipe.run
    if settings.executor == "ray":
        return RayExecutor(settings.workers, settings.ray_address, settings.task_retries)
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


def read_progress(task: Task) -> dict:
    """What a running task's progress file says now ({} before its first write)."""
    try:
        return json.loads(Path(task.progress).read_text()) if task.progress else {}
    except (OSError, ValueError):
        return {}


class LiveProgress:
    """Moves a step's bar from its running tasks' progress files, once a second; where the bar is off
    (no terminal), logs a line every WIT_PROGRESS_SECONDS (10): done, rate, share ok, top failures.
    Only running tasks' files are read: a finished task's figures are kept, its file removed."""

    def __init__(self, bar, label: str, unit: str):
        self.bar, self.label, self.unit = bar, label, unit
        self.running: dict[str, Task] = {}
        self.settled = [0, 0, collections.Counter()]  # done, ok, failures of the finished tasks
        self.lock = threading.Lock()
        self.every = float(os.environ.get("WIT_PROGRESS_SECONDS", "10"))
        self.start = time.monotonic()
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def started(self, task: Task) -> None:
        with self.lock:
            self.running[task.key] = task

    def finished(self, task: Task) -> None:
        p = read_progress(task)
        with self.lock:
            self.running.pop(task.key, None)
            self.settled[0] += task.weight
            self.settled[1] += int(p.get("ok", 0))
            self.settled[2].update({r: int(n) for r, n in p.get("failures", {}).items()})
        if task.progress:
            Path(task.progress).unlink(missing_ok=True)

    def snapshot(self) -> tuple[int, int, dict]:
        with self.lock:
            running = list(self.running.values())
            done, ok, failures = self.settled[0], self.settled[1], collections.Counter(self.settled[2])
        for t in running:
            p = read_progress(t)
            done += min(int(p.get("done", 0)), t.weight)
            ok += int(p.get("ok", 0))
            failures.update({r: int(n) for r, n in p.get("failures", {}).items()})
        return done, ok, dict(failures)

    def _watch(self) -> None:
        last_line = time.monotonic()
        while not self.halt.wait(1.0):
            done, ok, failures = self.snapshot()
            self.bar.n = done
            self.bar.refresh()
            if self.bar.disable and time.monotonic() - last_line >= self.every:
                last_line = time.monotonic()
                self.log(done, ok, failures)

    def log(self, done: int, ok: int, failures: dict) -> None:
        total = self.bar.total or 1
        rate = done / max(time.monotonic() - self.start, 1e-9)
        top = ", ".join(f"{r} {n:,}" for r, n in sorted(failures.items(), key=lambda x: -x[1])[:3])
        answered = ok + sum(failures.values())
        log.info("%s: %s of %s %ss (%.0f%%), %.1f/s; %.0f%% ok%s", self.label, f"{done:,}", f"{total:,}", self.unit,
                 100 * done / total, rate, 100 * ok / max(answered, 1), f"; failures: {top}" if top else "")

    def stop(self) -> None:
        self.halt.set()
        self.thread.join()
        self.bar.n = self.bar.total
        self.bar.refresh()


def run_step(stage, step: int, tasks: list[Task], executor, force: bool) -> dict:
    if removed := remove_stale_temporaries(tasks):
        log.info("%s: removed %d temporary files left by an interrupted run", stage.name, removed)
    pending = tasks if force else [t for t, m in zip(tasks, read_markers(tasks)) if m is None]
    skipped = len(tasks) - len(pending)
    if force:
        for t in pending:
            if t.work:
                shutil.rmtree(t.work, ignore_errors=True)
    label = stage.name if step == 0 else f"{stage.name} ({tasks[0].func.__name__ if tasks else 'empty'})"
    log.info("%s: %d partitions, %d already complete, %d to run", label, len(tasks), skipped, len(pending))
    failures: list[tuple[Task, BaseException]] = []
    if pending:
        bar = tqdm(total=sum(t.weight for t in pending), desc=label, unit=stage.unit, unit_scale=True,
                   disable=None, dynamic_ncols=True, file=CONSOLE)
        watch = LiveProgress(bar, label, stage.unit) if any(t.progress for t in pending) else None
        for task, result in executor.map(pending, started=watch.started if watch else None):
            if watch:
                watch.finished(task)
            else:
                bar.update(task.weight)
            if isinstance(result, BaseException):
                failures.append((task, result))
                log.error("%s/%s failed: %s", stage.name, task.key, result)
                log.debug("".join(traceback.format_exception(result)))
        if watch:
            watch.stop()
        bar.close()
        remove_stale_temporaries(pending)  # those of a task lost with its worker, which ran again
    if failures:
        lines = "\n".join(f"  {t.key}: {failure_text(e)}" for t, e in failures)
        raise WitError(
            f"{len(failures)} of {len(tasks)} partitions failed; the {len(tasks) - len(failures)} "
            f"others are complete and kept. Fix the input and rerun to do only the failed ones:\n{lines}",
            where=f"stage {stage.name}",
        )
    return {"partitions": len(tasks), "ran": len(pending), "skipped": skipped}


def run_stage(stage, run: Run, executor, force: bool = False) -> dict:
    """Run every step of a stage to completion and write its manifest. Returns the first step's
    counts (partitions, ran, skipped); raises WitError naming every failed partition."""
    plan = stage.plan(run)
    counts: dict | None = None
    outputs: set[str] = set()
    step = 0
    try:
        tasks = next(plan)
        while True:
            info = run_step(stage, step, tasks, executor, force)
            outputs.update(p for t in tasks for p in t.outputs)
            counts = counts or info
            step += 1
            tasks = plan.send(None)
    except StopIteration as done:
        manifest: Manifest = done.value
    from .stage import check_provides

    check_provides(stage, manifest)
    if not manifest.fingerprint:
        # Output paths enter relative to the run folder: a moved or copied run keeps its fingerprints.
        manifest.fingerprint = fingerprint([p["fingerprint"] for p in manifest.partitions]
                                           + [within(run.dir, manifest.outputs)])
    atomic_write_bytes(manifest_path(run, stage.name), manifest.to_json(run.dir))
    for folder in manifest.scratch:
        workspace.remove_tree(folder)
    if removed := remove_stale_outputs(outputs):
        log.info("%s: removed %d files of partitions that this plan no longer has", stage.name, removed)
    return counts or {"partitions": 0, "ran": 0, "skipped": 0}


RUN_FOLDER = "$RUN/"  # how a manifest spells the run folder


def within(folder: Path, value, mark: str = ""):
    """`value` (a path, or lists and dicts of them) with paths under `folder` made relative to it
    (and starting with `mark`)."""
    prefix = str(folder).rstrip("/") + "/"
    if isinstance(value, str):
        return mark + value.removeprefix(prefix) if value.startswith(prefix) else value
    if isinstance(value, list):
        return [within(folder, v, mark) for v in value]
    if isinstance(value, dict):
        return {k: within(folder, v, mark) for k, v in value.items()}
    return value


def in_run(folder: Path, value):
    """The reverse of `within(folder, value, RUN_FOLDER)`: paths made absolute again, under `folder`
    wherever the run folder now is."""
    if isinstance(value, str):
        return str(folder) + "/" + value.removeprefix(RUN_FOLDER) if value.startswith(RUN_FOLDER) else value
    if isinstance(value, list):
        return [in_run(folder, v) for v in value]
    if isinstance(value, dict):
        return {k: in_run(folder, v) for k, v in value.items()}
    return value


def failure_text(e: BaseException) -> str:
    """What a failed task's line says: the message, and the kind of error where it tells more."""
    if isinstance(e, MemoryError):  # Python's own and Arrow's out-of-memory errors
        return (f"{type(e).__name__}: {e or 'out of memory'} (a task holds one partition or one bucket: "
                "more buckets, smaller partitions or fewer workers hold less at once)")
    return str(e) or type(e).__name__


def remove_stale_outputs(outputs: set[str]) -> int:
    """Partition files (`part-*.parquet`, `bNNNNN.parquet`) beside this plan's outputs that the plan
    did not write: left by an earlier plan with other partitions (a new `partition_rows`, a renamed
    input). The DuckDB views read every part file of a folder, so they would be counted twice."""
    removed = 0
    for folder in {Path(p).parent for p in outputs}:
        for f in [*workspace.glob(folder, "part-*.parquet"), *workspace.glob(folder, "b[0-9][0-9][0-9][0-9][0-9].parquet")]:
            if str(f) not in outputs:
                workspace.remove(f)
                removed += 1
    return removed
