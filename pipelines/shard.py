"""Shards: WebDataset tars of the balanced corpus, shuffled globally, ready for open_clip's trainer.

Each sample is `{key}.jpg` (or the stored encoding), `{key}.txt` (the caption) and `{key}.json` (uid,
url, page_url, query ids and strings, width, height, sha256, phash, origin). The order across all
shards is a hash of (uid, seed), so a trainer reading shards in sequence still sees mixed queries, and
the same recipe gives the same shards. A shard closes at `samples_per_shard` samples or
`max_shard_mb`, whichever comes first. Beside the tars: `sizes.json` (open_clip's convention),
`shards.parquet` (uid -> shard, for DuckDB) and `wids.json` (a wids shard index).

Tars are written with ustar headers from the standard library's tarfile and plain writes for the data,
to a temporary name that is renamed into place, so a shard killed mid-write never looks complete.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wit_builder.runner import Stage, Task, is_complete
from wit_builder.workspace import Run, atomic_path, atomic_write_bytes, write_parquet

from .balance import BalanceStage, splitmix64, uid_to_u64

VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(key: str) -> str:
    """A member-name stem with no path separators, no '..' and no leading dot."""
    key = _UNSAFE.sub("_", key).lstrip("._-")
    return key or "sample"


def _template() -> bytes:
    """A ustar header from tarfile itself (mode 0444, mtime 0, root), to fill in per member."""
    info = tarfile.TarInfo("x")
    info.mode = 0o444
    return info.tobuf(format=tarfile.USTAR_FORMAT)


_TEMPLATE = _template()
_MODE_TO_SIZE, _MTIME, _AFTER_CHECKSUM = _TEMPLATE[100:124], _TEMPLATE[136:148], _TEMPLATE[156:]
# The checksum is the byte sum of the header with its checksum field as spaces: the fixed part once.
_FIXED_SUM = sum(_MODE_TO_SIZE) + sum(_MTIME) + sum(_AFTER_CHECKSUM) + 8 * ord(" ")


def tar_header(name: str, size: int) -> bytes:
    """tarfile's ustar header for a regular file of this name and size, built by filling in a
    template: the same bytes as TarInfo.tobuf, much faster (names are short ASCII here)."""
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"member name too long for ustar: {name!r}")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_FIXED_SUM + sum(raw) + sum(size_field))
    return b"".join((raw.ljust(100, b"\0"), _MODE_TO_SIZE, size_field, _MTIME, checksum, _AFTER_CHECKSUM))


def write_samples(f, samples: list[tuple[str, bytes, str, bytes]], ext: str) -> None:
    """The tar stream of (key, image, caption, json) samples."""
    for key, image, text, meta in samples:
        caption = text.encode()
        f.writelines((
            tar_header(f"{key}.{ext}", len(image)), image, b"\0" * (-len(image) % 512),
            tar_header(f"{key}.txt", len(caption)), caption, b"\0" * (-len(caption) % 512),
            tar_header(f"{key}.json", len(meta)), meta, b"\0" * (-len(meta) % 512)))
    f.write(b"\0" * 1024)  # the end-of-archive marker


def write_shard(path: str, samples: list[tuple[str, bytes, str, bytes]], ext: str) -> int:
    """Write a shard under a temporary name, fsync it and rename it into place; returns its size."""
    with atomic_path(path) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
        write_samples(f, samples, ext)
    return Path(path).stat().st_size


def shard_task(members: dict[str, list[str]], balanced: dict[str, str], images: dict[str, str],
               queries: str, ext: str, output: str) -> dict:
    """Gather one shard's samples (members: part key -> uids, in shard order) and write it."""
    qtable = pq.read_table(queries, columns=["query"])
    query_strings = qtable.column("query")
    order = [u for part in members for u in members[part]]
    position = {u: i for i, u in enumerate(order)}
    rows: list = [None] * len(order)
    for part, uids in members.items():
        wanted = pa.array(uids)
        meta = pq.read_table(balanced[part])
        meta = meta.filter(pc.is_in(meta.column("uid"), value_set=wanted))
        imgs = pq.read_table(images[part], columns=["uid", "image"])
        imgs = imgs.filter(pc.is_in(imgs.column("uid"), value_set=wanted))
        image_of = dict(zip(imgs.column("uid").to_pylist(), imgs.column("image").to_pylist()))
        for r in meta.to_pylist():
            qids = r["query_ids"]
            record = {"uid": r["uid"], "url": r["url"], "page_url": r["page_url"], "query_ids": qids,
                      "queries": query_strings.take(pa.array(qids, pa.int32())).to_pylist(),
                      "width": r["width"], "height": r["height"], "sha256": r["sha256"],
                      "phash": f"{r['phash']:016x}", "origin": r["origin"]}
            rows[position[r["uid"]]] = (safe_key(r["uid"]), image_of[r["uid"]], r["text"],
                                        json.dumps(record, ensure_ascii=False, sort_keys=True).encode())
    size = write_shard(output, rows, ext)
    return {"samples": len(rows), "bytes": size}


def plan(parts: dict[str, str], seed: int, per_shard: int, max_bytes: int) -> list[list[tuple[str, str]]]:
    """Shards as lists of (part key, uid), in the global hash-seeded order."""
    keys, uids, sizes = [], [], []
    for key, path in parts.items():
        t = pq.read_table(path, columns=["uid", "keep", "bytes"], filters=[("keep", "=", True)])
        keys += [key] * t.num_rows
        uids += t.column("uid").to_pylist()
        sizes += t.column("bytes").to_pylist()
    if not uids:
        return []
    with np.errstate(over="ignore"):
        rank = splitmix64(uid_to_u64(uids) ^ splitmix64(np.uint64(seed)))
    order = np.lexsort((np.array(uids), rank))
    shards, current, current_bytes = [], [], 0
    for i in order:
        approx = sizes[i] + 2048  # three headers and the caption and json, roughly
        if current and (len(current) >= per_shard or current_bytes + approx > max_bytes):
            shards.append(current)
            current, current_bytes = [], 0
        current.append((keys[i], uids[i]))
        current_bytes += approx
    shards.append(current)
    return shards


def write_index(shards: list[str], members: list[dict], sizes: list[int], balanced: dict[str, str],
                out_dir: str) -> dict:
    """The reduce: sizes.json, wids.json and shards.parquet."""
    out = Path(out_dir)
    counts = {Path(s).name: sum(len(u) for u in m.values()) for s, m in zip(shards, members)}
    atomic_write_bytes(out / "sizes.json", json.dumps(counts, indent=1).encode())
    wids = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": out.parent.name,
            "shardlist": [{"url": name, "nsamples": n} for name, n in counts.items()]}
    atomic_write_bytes(out / "wids.json", json.dumps(wids, indent=1).encode())
    shard_of = {}
    for s, m in zip(shards, members):
        for uids in m.values():
            for u in uids:
                shard_of[u] = Path(s).name
    tables = []
    for path in balanced.values():
        t = pq.read_table(path, columns=["uid", "query_ids", "bytes", "width", "height"],
                          filters=[("keep", "=", True)])
        tables.append(t)
    table = pa.concat_tables(tables)
    table = table.append_column("shard", pa.array([shard_of[u] for u in table.column("uid").to_pylist()]))
    write_parquet(table.sort_by([("shard", "ascending"), ("uid", "ascending")]), out / "shards.parquet")
    return {"shards": len(shards), "samples": sum(counts.values())}


class ShardStage(Stage):
    name = "shards"

    def tasks(self, run: Run) -> list[Task]:
        upstream = BalanceStage().tasks(run)
        if not upstream or not all(is_complete(t) for t in upstream):
            return []  # planned once balancing is complete: the plan depends on its output
        s, d = run.recipe.shards, run.recipe.download
        balanced = {t.key: t.outputs[0] for t in upstream}
        images = {t.key: t.kwargs["hashes"].replace("/dedup/hashes/", "/download/images/") for t in upstream}
        out = run.stage_dir(self.name)
        self._members, tasks = [], []
        fingerprints = [t.fingerprint for t in upstream]
        for i, shard in enumerate(plan(balanced, run.recipe.run.seed, s.samples_per_shard,
                                       int(s.max_shard_mb * (1 << 20)))):
            members: dict[str, list[str]] = {}
            for key, uid in shard:
                members.setdefault(key, []).append(uid)
            output = str(out / f"{i:06d}.tar")
            tasks.append(Task(
                stage=self.name, key=f"{i:06d}", func=shard_task,
                kwargs={"members": members, "balanced": {k: balanced[k] for k in members},
                        "images": {k: images[k] for k in members},
                        "queries": str(run.stage_dir("queries") / "queries.parquet"),
                        "ext": d.encode_format, "output": output},
                outputs=[output], marker=str(run.marker_path(self.name, f"{i:06d}")),
                inputs={"version": VERSION, "upstream": fingerprints, "members": members,
                        "ext": d.encode_format},
                weight=len(shard)))
        return tasks

    def reduce_task(self, run: Run, tasks: list[Task]) -> Task | None:
        if not tasks:
            return None
        out = run.stage_dir(self.name)
        balanced = {k: v for t in tasks for k, v in t.kwargs["balanced"].items()}
        return Task(stage=self.name, key="_reduce", func=write_index,
                    kwargs={"shards": [t.outputs[0] for t in tasks],
                            "members": [t.kwargs["members"] for t in tasks], "sizes": [],
                            "balanced": balanced, "out_dir": str(out)},
                    outputs=[str(out / n) for n in ("sizes.json", "wids.json", "shards.parquet")],
                    marker=str(run.marker_path(self.name, "_reduce")),
                    inputs={"version": VERSION, "shards": [t.fingerprint for t in tasks]})
