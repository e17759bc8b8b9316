"""Dedup: exact duplicates (image sha256, normalised URL), near duplicates (pHash within Hamming
distance k), and images that overlap an evaluation set.

Map, per downloaded partition: `dedup/hashes/part-<key>.parquet` (uid, url, sha256, phash, width,
height, query_ids). Reduce, over all of them: `dedup/dedup.parquet` (uid, sha256, phash, keep, dup_of,
reason, distance) and `dedup/query_counts.parquet`, the per-query counts of the survivors that
balancing needs.

Duplicates form a graph (same sha256, same URL, or pHashes within k); each connected group keeps one
member: the one matching the most queries, then the larger image, then the smallest uid. Every other
member records the kept one as `dup_of`, with the reason `exact_image`, `same_url` or
`near_duplicate`. An image within k of an evaluation image is removed as `eval_overlap`, with the
evaluation image as `dup_of`, as the CLIP paper's overlap analysis did.
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wit_builder.errors import WitError
from wit_builder.runner import Stage, Task
from wit_builder.workspace import Run, file_identity, write_parquet

from .download import DownloadStage
from .neardup import near_duplicate_pairs
from .phash import SIDE, phash_bytes, phash_pixels

VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


def hash_part(status: str, images: str, matched: str, output: str) -> dict:
    imgs = pq.read_table(images)
    meta = pq.read_table(status, columns=["uid", "width", "height"])
    queries = pq.read_table(matched, columns=["uid", "url", "query_ids"])
    hashes, ok = phash_bytes(imgs.column("image").to_pylist())
    uid = imgs.column("uid")
    m = meta.take(pc.index_in(uid, value_set=meta.column("uid")))
    q = queries.take(pc.index_in(uid, value_set=queries.column("uid")))
    table = pa.table({"uid": uid, "url": q.column("url"), "sha256": imgs.column("sha256"),
                      "phash": pa.array(hashes, pa.uint64()), "ok": pa.array(ok),
                      "width": m.column("width"), "height": m.column("height"),
                      "query_ids": q.column("query_ids")}).sort_by("uid")
    write_parquet(table, output)
    return {"images": table.num_rows, "unhashable": int((~ok).sum())}


# --- evaluation sets ------------------------------------------------------------------------------


def fashion_mnist_pixels(folder: Path) -> np.ndarray:
    """Debian's dataset-fashion-mnist: the idx files of both splits, as (n, 28, 28) uint8."""
    arrays = []
    for split in ("train", "t10k"):
        path = folder / f"{split}-images-idx3-ubyte.gz"
        if not path.exists():
            raise WitError("no Fashion-MNIST here (apt-get install dataset-fashion-mnist)", where=str(path))
        data = gzip.decompress(path.read_bytes())
        arrays.append(np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28))
    return np.concatenate(arrays)


def eval_hashes(kind: str, path: str) -> tuple[np.ndarray, list[str]]:
    """(pHashes, ids) of an evaluation set: an image folder, WebDataset tars, or Fashion-MNIST."""
    from PIL import Image

    p = Path(path)
    if kind == "fashion-mnist":
        pixels = fashion_mnist_pixels(p)
        small = np.stack([np.asarray(Image.fromarray(x).resize((SIDE, SIDE), Image.Resampling.LANCZOS))
                          for x in pixels])
        return phash_pixels(small), [f"train:{i}" if i < 60_000 else f"test:{i - 60_000}"
                                     for i in range(len(pixels))]
    blobs, ids = [], []
    if kind == "folder":
        for f in sorted(p.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                blobs.append(f.read_bytes())
                ids.append(str(f.relative_to(p)))
    elif kind == "webdataset":
        tars = sorted(p.glob("*.tar")) if p.is_dir() else [p]
        for t in tars:
            with tarfile.open(t) as tf:
                for member in tf:
                    if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                        blobs.append(tf.extractfile(member).read())
                        ids.append(f"{t.name}:{member.name}")
    if not blobs:
        raise WitError(f"no images in this {kind} evaluation set", where=path)
    hashes, ok = phash_bytes(blobs)
    return hashes[ok], [i for i, good in zip(ids, ok) if good]


# --- the reduce -----------------------------------------------------------------------------------


def decide(parts: list[str], radius: int, eval_sets: list[dict], out_dir: str) -> dict:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    table = pa.concat_tables([pq.read_table(p) for p in parts])
    table = table.filter(table.column("ok")).sort_by("uid")
    if table.num_rows == 0:  # nothing downloaded (yet): an empty corpus, not an error
        out = Path(out_dir)
        write_parquet(pa.table({"uid": pa.array([], pa.string()), "sha256": pa.array([], pa.string()),
                                "phash": pa.array([], pa.uint64()), "keep": pa.array([], pa.bool_()),
                                "dup_of": pa.array([], pa.string()), "reason": pa.array([], pa.string()),
                                "distance": pa.array([], pa.int32())}), out / "dedup.parquet")
        write_parquet(pa.table({"query_id": pa.array([], pa.int32()), "count": pa.array([], pa.int64())}),
                      out / "query_counts.parquet")
        return {"images": 0, "kept": 0}
    n = table.num_rows
    uids = table.column("uid").to_pylist()
    hashes = table.column("phash").to_numpy()
    nq = pc.list_value_length(table.column("query_ids")).to_numpy(zero_copy_only=False)
    area = (table.column("width").to_numpy(zero_copy_only=False).astype(np.int64)
            * table.column("height").to_numpy(zero_copy_only=False))

    # Edges: equal sha256, equal URL, pHash within the radius.
    edges_i, edges_j = [], []
    for column in ("sha256", "url"):
        codes = pc.dictionary_encode(table.column(column)).combine_chunks().indices.to_numpy()
        order = np.argsort(codes, kind="stable")
        same = codes[order][1:] == codes[order][:-1]
        edges_i.append(order[:-1][same])
        edges_j.append(order[1:][same])
    ni, nj, _ = near_duplicate_pairs(hashes, radius)
    edges_i.append(ni)
    edges_j.append(nj)
    i = np.concatenate(edges_i)
    j = np.concatenate(edges_j)
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    _, group = connected_components(graph, directed=False)

    # The keeper of each group: most queries, then the larger image, then the smallest uid (uids are
    # sorted, so the row index breaks the last tie).
    rank = np.lexsort((np.arange(n), -area, -nq, group))
    first = np.r_[True, group[rank][1:] != group[rank][:-1]]
    keeper_of_group = np.empty(group.max() + 1, np.int64)
    keeper_of_group[group[rank][first]] = rank[first]
    keeper = keeper_of_group[group]

    sha = table.column("sha256").to_pylist()
    urls = table.column("url").to_pylist()
    keep = keeper == np.arange(n)
    dup_of = [None if keep[r] else uids[keeper[r]] for r in range(n)]
    reason = [None if keep[r] else ("exact_image" if sha[r] == sha[keeper[r]] else
                                    "same_url" if urls[r] == urls[keeper[r]] else "near_duplicate")
              for r in range(n)]
    distance = np.where(keep, 0, np.bitwise_count(hashes ^ hashes[keeper])).astype(np.int32)

    overlaps = 0
    for spec in eval_sets:
        ehashes, eids = eval_hashes(spec["kind"], spec["path"])
        both = np.concatenate([hashes, ehashes])
        a, b, d = near_duplicate_pairs(both, radius)
        cross = (a < n) & (b >= n)
        for r, e, dist in zip(a[cross], b[cross], d[cross]):
            if reason[r] != "eval_overlap":
                overlaps += 1
                keep[r] = False
                reason[r] = "eval_overlap"
                dup_of[r] = f"{spec['name']}:{eids[e - n]}"
                distance[r] = dist

    out = Path(out_dir)
    write_parquet(pa.table({
        "uid": uids, "sha256": table.column("sha256"), "phash": table.column("phash"),
        "keep": pa.array(keep), "dup_of": pa.array(dup_of, pa.string()),
        "reason": pa.array(reason, pa.string()), "distance": pa.array(distance, pa.int32()),
    }), out / "dedup.parquet")
    survivors = table.filter(pa.array(keep)).column("query_ids")
    flat = pc.list_flatten(survivors).to_numpy(zero_copy_only=False)
    counts = np.bincount(flat) if len(flat) else np.zeros(0, np.int64)
    nz = np.flatnonzero(counts)
    write_parquet(pa.table({"query_id": pa.array(nz, pa.int32()), "count": pa.array(counts[nz], pa.int64())}),
                  out / "query_counts.parquet")
    reasons: dict[str, int] = {}
    for r in reason:
        if r:
            reasons[r] = reasons.get(r, 0) + 1
    return {"images": n, "kept": int(keep.sum()), **reasons}


class DedupStage(Stage):
    name = "dedup"

    def tasks(self, run: Run) -> list[Task]:
        out = run.stage_dir(self.name)
        tasks = []
        for t in DownloadStage().tasks(run):
            output = str(out / "hashes" / f"part-{t.key}.parquet")
            tasks.append(Task(
                stage=self.name, key=t.key, func=hash_part,
                kwargs={"status": t.outputs[0], "images": t.outputs[1], "matched": t.kwargs["matched"],
                        "output": output},
                outputs=[output], marker=str(run.marker_path(self.name, t.key)),
                inputs={"version": VERSION, "upstream": t.fingerprint}, weight=t.weight))
        return tasks

    def reduce_task(self, run: Run, tasks: list[Task]) -> Task | None:
        if not tasks:
            return None
        d = run.recipe.dedup
        eval_sets = [{"name": e.name, "kind": e.kind, "path": str(run.recipe.path(e.path))} for e in d.eval_sets]
        identities = []
        for e in eval_sets:
            p = Path(e["path"])
            files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
            identities.append([file_identity(f) for f in files if f.exists()])
        out = run.stage_dir(self.name)
        return Task(stage=self.name, key="_reduce", func=decide,
                    kwargs={"parts": [t.outputs[0] for t in tasks], "radius": d.radius,
                            "eval_sets": eval_sets, "out_dir": str(out)},
                    outputs=[str(out / "dedup.parquet"), str(out / "query_counts.parquet")],
                    marker=str(run.marker_path(self.name, "_reduce")),
                    inputs={"version": VERSION, "parts": [t.fingerprint for t in tasks],
                            "radius": d.radius, "eval": eval_sets, "eval_files": identities})
