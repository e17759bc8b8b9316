"""The run workspace: one folder per recipe, atomic writes, and completion markers.

Layout (see README): runs/<name>/recipe.toml, one folder per stage, and _state/<stage>/<key>.json
markers. A marker is written last, after every output of its partition has been renamed into place,
so a partition with a marker is complete and one without it is redone.

A run folder can live in an object store (`run.root = "s3://..."`). Its files are then written under
temporary names in a local staging folder at the same relative place, each uploaded as soon as it is
complete and its local copy removed; every read of a run file goes to the store. An object appears whole or not at
all, so the same order (outputs first, the marker last) keeps its meaning without a rename, and no
node reads another node's disk. Only work in progress (`LOCAL_ONLY`) stays on the node that does it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .recipe import Recipe

# A run folder's local staging folder -> its URL in a store (see the module's docstring).
_stores: dict[str, str] = {}
# Names of files and folders of a run that stay on the node that writes them: resumable work in
# progress, caches, the driver's lock and log, and the progress files the driver polls.
LOCAL_ONLY = {"_work", "_robots", "lock", "wit.log"}


def use_store(staging: str | os.PathLike, url: str) -> None:
    """Files under `staging` belong to the run folder at `url` (this process, and the workers that
    are told so)."""
    _stores[str(staging).rstrip("/") + "/"] = url.rstrip("/") + "/"


def stores() -> dict[str, str]:
    return dict(_stores)


def in_store(path: str | os.PathLike) -> str | None:
    """The URL of a run file staged at `path`; None for a local file (or one that stays local)."""
    text = str(path)
    for staging, url in _stores.items():
        if text.startswith(staging) or text + "/" == staging:
            rel = text[len(staging):]
            if rel.endswith(".progress") or LOCAL_ONLY.intersection(rel.split("/")):
                return None
            return url + rel
    return None


def location(path: str | os.PathLike) -> str:
    """Where a run file is read from: its URL in the store, or the local path."""
    return in_store(path) or str(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary name beside `path`; rename it into place only if the block succeeds (in a
    store: upload it, then drop the local copy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    url = in_store(path)
    try:
        yield tmp
        if url:  # the store keeps it: the staged copy needs no fsync and no rename
            storage.upload(tmp, url)
            return
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


def _read_ranges(path: str | os.PathLike, spans: list[tuple[int, int]]) -> list[bytes]:
    if url := in_store(path):
        return storage.read_ranges(url, spans)  # ranged GETs, in parallel
    with open(path, "rb") as f:
        out = []
        for offset, length in spans:
            f.seek(offset)
            out.append(f.read(length))
        return out


def read_spans(files: list[tuple[str | os.PathLike, list[tuple[int, int]]]]) -> list[list[bytes]]:
    """For each (run file, its (offset, length) spans), the bytes of those spans; counted as a file
    opened each and a read request per span. In a store the files are fetched many at a time (a
    shuffle's bucket reads a span or two from each of many maps)."""
    _opened[0] += len(files)
    _requests[0] += sum(len(spans) for _, spans in files)
    if len(files) > 1 and any(in_store(path) for path, _ in files):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda f: _read_ranges(*f), files))
    return [_read_ranges(path, spans) for path, spans in files]


def read_bytes(path: str | os.PathLike) -> bytes:
    """A whole (small) run file: a marker, a manifest, a JSON side file."""
    _opened[0] += 1
    _requests[0] += 1
    if url := in_store(path):
        return storage.read_bytes(url)
    return Path(path).read_bytes()


def read_many(paths: list) -> dict[str, bytes]:
    """The whole (small) run files among `paths` that exist, by path: in a store, fetched together,
    so that checking a stage's markers costs one round of requests, not one request after another."""
    found, urls = {}, {}
    _requests[0] += len(paths)
    for p in map(str, paths):
        if url := in_store(p):
            urls[url] = p
        else:
            with contextlib.suppress(FileNotFoundError):
                found[p] = Path(p).read_bytes()
    for url, data in storage.read_many(list(urls)).items():
        found[urls[url]] = data
    return found


def read_table(path: str | os.PathLike, **kwargs) -> pa.Table:
    """pyarrow.parquet.read_table, counted: every stage reads its inputs through here, so a task's
    marker can say how many files it opened (see io_counters). Two read requests: the footer,
    then the columns it needs (pyarrow coalesces their ranges)."""
    _opened[0] += 1
    _requests[0] += 2
    if url := in_store(path):
        fs, key = storage.arrow_filesystem(url)
        return pq.read_table(key, filesystem=fs, **kwargs)
    return pq.read_table(path, **kwargs)


def parquet_file(path: str | os.PathLike) -> pq.ParquetFile:
    """pyarrow.parquet.ParquetFile, counted like read_table: for reading a file in row groups (the
    footer is counted here; each row group read is a request of its own, counted by the caller)."""
    _opened[0] += 1
    _requests[0] += 1
    if url := in_store(path):
        return pq.ParquetFile(storage.open_input(url))
    return pq.ParquetFile(path)


def glob(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """The run files in `folder` matching `pattern`, sorted, as (staging) paths. A listing: one read
    request per 1,000 names (a store's page)."""
    if url := in_store(folder):
        found = [Path(folder) / u.rsplit("/", 1)[1] for u in storage.glob(url.rstrip("/") + "/" + pattern)]
    else:
        found = sorted(Path(folder).glob(pattern))
    _requests[0] += 1 + len(found) // 1000
    return found


def remove(path: str | os.PathLike) -> None:
    """Delete a run file (in its store too); a missing one is fine."""
    if url := in_store(path):
        storage.remove(url)
    Path(path).unlink(missing_ok=True)


def remove_tree(folder: str | os.PathLike) -> None:
    """Delete a folder of run files (in its store too); a missing one is fine."""
    import shutil

    if url := in_store(folder):
        storage.remove(url, recursive=True)
    shutil.rmtree(folder, ignore_errors=True)


def duckdb_paths(con, paths: list[str]) -> list[str]:
    """`paths` as DuckDB should read them in `con`: through the store's filesystem (registered on
    `con`; DuckDB takes an fsspec filesystem as it is) where they are in one. Counted as files opened
    and, like read_table, two read requests each (for a task that reads them all)."""
    _opened[0] += len(paths)
    _requests[0] += 2 * len(paths)
    urls = [location(p) for p in paths]
    for url in urls:
        if storage.is_object_url(url):
            storage.register_with_duckdb(con, url)
            break
    return urls


_opened = [0]  # files opened (ranged reads of one file counted once)
_requests = [0]  # read requests: whole-file reads, ranged reads, listing pages


def count_requests(n: int) -> None:
    """Count read requests made outside this module's readers (e.g. a parquet file's row groups)."""
    _requests[0] += n


def _proc_io() -> dict[str, int]:
    try:
        lines = Path("/proc/self/io").read_text().split("\n")
    except OSError:  # not Linux: the figures are simply absent
        return {}
    return {k: int(v) for k, _, v in (line.partition(": ") for line in lines) if v}


@contextlib.contextmanager
def io_counters():
    """Measure the block: wall and CPU seconds, bytes read and written (/proc/self/io), files opened
    and read requests made through this module's readers, and peak resident memory (VmHWM, reset at the start). Yields a dict filled in
    at the end."""
    import resource

    cost: dict = {}
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak-RSS watermark
    before, opened, requests = _proc_io(), _opened[0], _requests[0]
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    yield cost
    after, end = _proc_io(), resource.getrusage(resource.RUSAGE_SELF)
    cost["seconds"] = round(time.perf_counter() - start, 4)
    cost["cpu_seconds"] = round(end.ru_utime + end.ru_stime - usage.ru_utime - usage.ru_stime, 4)
    cost["files_read"] = _opened[0] - opened
    cost["read_requests"] = _requests[0] - requests
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
        # In a store: `dir` is the local staging folder, `store` the run folder's URL.
        self.store = recipe.run_store
        if self.store:
            use_store(self.dir, self.store)

    @property
    def place(self) -> str:
        """Where the run folder is, for people: its URL in a store, or its path."""
        return self.store or str(self.dir)

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    @property
    def state_dir(self) -> Path:
        """Markers and manifests: `_state/<stage>/<key>.json`, `_state/<stage>/_manifest.json`."""
        return self.dir / "_state"

    def marker_path(self, stage: str, key: str) -> Path:
        return self.state_dir / stage / f"{key}.json"

    def save_recipe(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / "recipe.toml", self.recipe.resolved_toml().encode())


def write_marker(path: str | os.PathLike, fingerprint: str, outputs: list[str], info: dict) -> None:
    body = {"fingerprint": fingerprint, "outputs": outputs, "finished": time.time(), **info}
    atomic_write_bytes(path, json.dumps(body, indent=1, sort_keys=True).encode())
