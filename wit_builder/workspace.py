"""The run workspace: one folder per recipe, atomic writes, and completion markers.

Layout (see README): runs/<name>/recipe.toml, one folder per stage, and _state/<stage>/<key>.json
markers. A marker is written last, after every output of its partition has been renamed into place,
so a partition with a marker is complete and one without it is redone.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .recipe import Recipe


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary name beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_parquet(table: pa.Table, path: str | os.PathLike, compression: str = "zstd",
                  row_group_size: int | None = None) -> None:
    """Write a parquet file atomically, with settings fixed so equal tables give equal bytes."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression, write_statistics=True,
                       row_group_size=row_group_size)


@contextlib.contextmanager
def parquet_writer(path: str | os.PathLike, schema: pa.Schema):
    """A streaming, atomic parquet writer: write tables (row groups) one at a time, so memory stays
    at one row group however large the file; the file appears only if the block succeeds."""
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd", write_statistics=True) as writer:
            yield writer


def open_input(path: str | os.PathLike):
    """open(path, "rb"), counted like read_table."""
    _opened[0] += 1
    return open(path, "rb")


def read_table(path: str | os.PathLike, **kwargs) -> pa.Table:
    """pyarrow.parquet.read_table, counted: every stage reads its inputs through here, so a task's
    marker can say how many files it opened (see io_counters)."""
    _opened[0] += 1
    return pq.read_table(path, **kwargs)


def parquet_file(path: str | os.PathLike) -> pq.ParquetFile:
    """pyarrow.parquet.ParquetFile, counted like read_table: for reading a file in row groups."""
    _opened[0] += 1
    return pq.ParquetFile(path)


_opened = [0]


def _proc_io() -> dict[str, int]:
    try:
        lines = Path("/proc/self/io").read_text().split("\n")
    except OSError:  # not Linux: the figures are simply absent
        return {}
    return {k: int(v) for k, _, v in (line.partition(": ") for line in lines) if v}


@contextlib.contextmanager
def io_counters():
    """Measure the block: wall and CPU seconds, bytes read and written (/proc/self/io), files opened
    through read_table, and peak resident memory (VmHWM, reset at the start). Yields a dict filled in
    at the end."""
    import resource

    cost: dict = {}
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak-RSS watermark
    before, opened = _proc_io(), _opened[0]
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    yield cost
    after, end = _proc_io(), resource.getrusage(resource.RUSAGE_SELF)
    cost["seconds"] = round(time.perf_counter() - start, 4)
    cost["cpu_seconds"] = round(end.ru_utime + end.ru_stime - usage.ru_utime - usage.ru_stime, 4)
    cost["files_read"] = _opened[0] - opened
    cost["pid"] = os.getpid()
    if before and after:
        cost["bytes_read"] = after["rchar"] - before["rchar"]
        cost["bytes_written"] = after["wchar"] - before["wchar"]
    with contextlib.suppress(OSError, StopIteration):
        status = Path("/proc/self/status").read_text().split("\n")
        cost["peak_rss"] = int(next(x for x in status if x.startswith("VmHWM")).split()[1]) * 1024


def file_identity(path: str | os.PathLike) -> dict:
    """What an input file contributes to a fingerprint: a changed file means recompute. An object in
    a store (s3://...) is known by its URL, ETag and size, the same from any machine."""
    from . import storage

    if storage.is_object_url(str(path)):
        return storage.identity(str(path))
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One `wit run` at a time on a run folder. The lock is the kernel's (flock), so it dies with
    its process: a run killed with kill -9 leaves no stale lock. The file says who holds it."""
    import fcntl
    import socket

    from .errors import WitError

    path = Path(run_dir) / "_state" / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise WitError(f"another wit run is using this run folder ({holder}); wait for it to finish, "
                       "or stop it", where=str(run_dir)) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


class Run:
    """A run folder named by its recipe."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.dir = recipe.run_dir

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    def marker_path(self, stage: str, key: str) -> Path:
        return self.dir / "_state" / stage / f"{key}.json"

    def read_marker(self, stage: str, key: str) -> dict | None:
        try:
            return json.loads(self.marker_path(stage, key).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def save_recipe(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / "recipe.toml", self.recipe.resolved_toml().encode())


def write_marker(path: str | os.PathLike, fingerprint: str, outputs: list[str], info: dict) -> None:
    body = {"fingerprint": fingerprint, "outputs": outputs, "finished": time.time(), **info}
    atomic_write_bytes(path, json.dumps(body, indent=1, sort_keys=True).encode())
