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


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a parquet file atomically, with settings fixed so equal tables give equal bytes."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=True)


def file_identity(path: str | os.PathLike) -> dict:
    """What an input file contributes to a fingerprint: a changed file means recompute."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


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
