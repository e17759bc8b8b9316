"""Dedup: exact duplicates (image sha256, normalised URL), near duplicates (pHash within Hamming
distance k), and images that overlap an evaluation set, as a shuffle that scales with the corpus.

1. Map, per downloaded partition: each successful image becomes hash records, scattered into B
   buckets by key: its exact keys (sha256, URL) and k + 1 pHash band records (below).
2. One task per bucket: duplicate edges between records with the same exact key, and between pHashes
   within k; hits on evaluation images. `dedup/_shuffle/<plan>/edges/` and `hits/`.
3. Group, one task: union-find over the edges only (memory O(duplicate edges), never O(images)); each
   connected group keeps one member: the one matching the most queries, then the larger image, then
   the smallest uid. Every other member records the kept one as `dup_of`, with the reason
   `exact_image` (same bytes as the keeper), `same_url` or `near_duplicate`, and its Hamming distance
   to the keeper. An image within k of an evaluation image is removed as `eval_overlap`, with the
   evaluation image as `dup_of`, as the CLIP paper's overlap analysis did. Written sorted by partition.
4. Per partition: `dedup/part-<key>.parquet` (every image: uid, url, sha256, phash, width, height,
   query_ids, keep, dup_of, reason, distance) and the survivors' per-query counts; then the counts are
   summed into `dedup/query_counts.parquet`, which balancing needs.

Near duplicates, recall 1.0: cut the 64 bits into m = k + r blocks. Two hashes within k differ in at
most k blocks, so they agree exactly on at least r; take the first r blocks they agree on, whose
smallest is block i <= k. A hash is keyed by each block i <= k (its block-i bits) and goes to the
buckets of those k + 1 keys, once to each bucket, with a bit mask of the blocks that led there; the
bucket task compares only hashes that share block i and also agree on r - 1 later blocks. So a hash
is written at most k + 1 times whatever r is; r grows with the corpus (`neardup.band_r`) so that
hashes rarely share a key by chance.
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path
from typing import Literal

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from wit_builder import storage
from wit_builder.errors import WitError
from wit_builder.ids import fingerprint
from wit_builder.recipe import Recipe, Section
from wit_builder.runner import Manifest, combined_fingerprint, completed, step_info
from wit_builder.shuffle import FORMAT as SHUFFLE_FORMAT
from wit_builder.shuffle import (
    SLICE_ROW_GROUP,
    bucket_folder,
    bucket_of,
    read_bucket,
    read_slice,
    scatter,
    splitmix64,
    string_hash64,
    take_by_uid,
    tracking_task,
    u64_to_uid,
    uid_to_u64,
)
from wit_builder.stage import Stage, View
from wit_builder.workspace import Run, file_identity, parquet_file, read_table, write_parquet

from ..phash import SIDE, phash_bytes, phash_pixels
from ..sampling import query_counts, sum_counts_steps, sums_folder
from .neardup import band_r, blocks, close_pairs, collapse_identical

VERSION = 4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
RECORDS_PER_BUCKET = 4_000_000  # band records; a bucket task then peaks near 1 GB

EXACT_SCHEMA = pa.schema([("kind", pa.uint8()), ("key", pa.uint64()), ("part", pa.int32()),
                          ("uid", pa.uint64()), ("rank", pa.uint64()), ("phash", pa.uint64())])
# part < 0: an evaluation image (set -part - 1, its index in uid).
BAND_SCHEMA = pa.schema([("blocks", pa.uint32()), ("phash", pa.uint64()), ("part", pa.int32()),
                         ("uid", pa.uint64()), ("rank", pa.uint64())])
EDGE_SCHEMA = pa.schema([("kind", pa.uint8())] + [(f"{side}_{name}", t) for side in "ab" for name, t in
                        (("part", pa.int32()), ("uid", pa.uint64()), ("rank", pa.uint64()),
                         ("phash", pa.uint64()))])
HIT_SCHEMA = pa.schema([("part", pa.int32()), ("uid", pa.uint64()), ("distance", pa.int32()),
                        ("eval_set", pa.int32()), ("eval_index", pa.uint64())])
DECISION_SCHEMA = pa.schema([("part", pa.int32()), ("uid", pa.string()), ("dup_of", pa.string()),
                             ("reason", pa.string()), ("distance", pa.int32())])
COUNTS_SCHEMA = pa.schema([("query_id", pa.int32()), ("count", pa.int64())])
DEDUP_SCHEMA = pa.schema([
    ("uid", pa.string()), ("url", pa.string()), ("sha256", pa.string()), ("phash", pa.uint64()),
    ("width", pa.int32()), ("height", pa.int32()), ("query_ids", pa.list_(pa.int32())),
    ("keep", pa.bool_()), ("dup_of", pa.string()), ("reason", pa.string()), ("distance", pa.int32()),
])
SHA, URL, NEAR = 0, 1, 2  # edge kinds
REASONS = pa.array(["exact_image", "same_url", "near_duplicate"])  # a removed image's reason, by code


def keeper_rank(query_ids: pa.ChunkedArray, width, height) -> np.ndarray:
    """Smaller is a better keeper: more queries first, then the larger image."""
    nq = np.minimum(pc.list_value_length(query_ids).to_numpy(zero_copy_only=False), 255).astype(np.uint64)
    area = (np.asarray(width, np.int64) * np.asarray(height, np.int64)).clip(0, (1 << 48) - 1).astype(np.uint64)
    return ((np.uint64(255) - nq) << np.uint64(48)) | (np.uint64((1 << 48) - 1) - area)


def survivors_input(status: str, matched: str) -> pa.Table:
    """The partition's successfully downloaded images with what dedup and balance need, by uid."""
    s = read_table(status, columns=["uid", "status", "sha256", "phash", "width", "height"])
    s = s.filter(pc.equal(s.column("status"), "success")).drop_columns(["status"]).sort_by("uid")
    m = take_by_uid(read_table(matched, columns=["uid", "url", "query_ids"]), s.column("uid"))
    return pa.table({"uid": s.column("uid"), "url": m.column("url"), "sha256": s.column("sha256"),
                     "phash": s.column("phash"), "width": s.column("width"), "height": s.column("height"),
                     "query_ids": m.column("query_ids")})


@numba.njit(cache=True)
def _records_per_bucket(bucket):
    """Rows (hash, block mask, bucket) from each hash's block buckets (k + 1, n): block i's record
    unless an earlier block's went to the same bucket; its mask, every block that goes there."""
    keyed, n = bucket.shape
    rows = np.empty(keyed * n, np.int64)
    masks = np.empty(keyed * n, np.uint32)
    where = np.empty(keyed * n, np.int64)
    count = 0
    for i in range(keyed):
        for x in range(n):
            first, mask = True, np.uint32(0)
            for j in range(keyed):
                if bucket[j, x] == bucket[i, x]:
                    first = first and j >= i
                    mask |= np.uint32(1) << np.uint32(j)
            if first:
                rows[count], masks[count], where[count] = x, mask, bucket[i, x]
                count += 1
    return rows[:count], masks[:count], where[:count]


def band_records(phash: np.ndarray, part: np.ndarray, uid: np.ndarray, rank: np.ndarray, radius: int,
                 r: int, buckets: int) -> tuple[pa.Table, np.ndarray]:
    """Each hash's band records and their buckets: one record per bucket that any of its k + 1 block
    keys hashes to, with `blocks` the bit mask of those blocks, so a bucket holds each image once."""
    keyed = blocks(radius + r)[: radius + 1]
    bucket = np.stack([bucket_of(splitmix64(((phash >> np.uint64(shift)) & np.uint64((1 << width) - 1))
                                            ^ (np.uint64(i + 1) << np.uint64(56))), buckets).astype(np.int64)
                       for i, (shift, width) in enumerate(keyed)])
    rows, masks, where = _records_per_bucket(bucket)
    table = pa.table({"blocks": masks, "phash": phash[rows], "part": pa.array(part[rows], pa.int32()),
                      "uid": uid[rows], "rank": rank[rows]}, schema=BAND_SCHEMA)
    return table, where


def map_part(status: str, matched: str, part: int, radius: int, r: int, buckets: int, shuffle: str) -> dict:
    """Step 1: scatter one partition's hash records."""
    t = survivors_input(status, matched)
    n = t.num_rows
    uid = uid_to_u64(t.column("uid"))
    phash = t.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64)
    rank = keeper_rank(t.column("query_ids"), t.column("width").to_numpy(zero_copy_only=False),
                       t.column("height").to_numpy(zero_copy_only=False))
    parts = np.full(n, part, np.int32)
    sha = uid_to_u64(pc.utf8_slice_codeunits(t.column("sha256"), 0, 16)) if n else np.zeros(0, np.uint64)
    url = string_hash64(t.column("url")) if n else np.zeros(0, np.uint64)
    exact = pa.table({"kind": pa.array(np.r_[np.zeros(n), np.ones(n)].astype(np.uint8)),
                      "key": np.r_[sha, url], "part": pa.array(np.r_[parts, parts], pa.int32()),
                      "uid": np.r_[uid, uid], "rank": np.r_[rank, rank], "phash": np.r_[phash, phash]},
                     schema=EXACT_SCHEMA)
    exact_bucket = bucket_of(splitmix64(exact.column("key").to_numpy() ^ np.r_[np.zeros(n), np.ones(n)]
                                        .astype(np.uint64)), buckets)
    scatter(exact, exact_bucket, shuffle, f"{part:06d}.exact", buckets)
    scatter(*band_records(phash, parts, uid, rank, radius, r, buckets), shuffle, f"{part:06d}.near", buckets)
    return {"images": n}


def map_eval(index: int, kind: str, path: str, radius: int, r: int, buckets: int, shuffle: str,
             ids_output: str) -> dict:
    """Step 1 for an evaluation set: its band records, and its image ids for the group step."""
    hashes, ids = eval_hashes(kind, path)
    write_parquet(pa.table({"id": pa.array(ids, pa.string())}), ids_output)
    n = len(hashes)
    scatter(*band_records(hashes, np.full(n, -(index + 1), np.int32), np.arange(n, dtype=np.uint64),
                          np.zeros(n, np.uint64), radius, r, buckets), shuffle, f"eval{index:03d}.near", buckets)
    return {"images": n}


# --- step 2: one bucket ---------------------------------------------------------------------------


def _edges(kind, a: dict, b: dict, ia: np.ndarray, ib: np.ndarray) -> pa.Table:
    cols = {"kind": pa.array(np.full(len(ia), kind, np.uint8))}
    for side, src, idx in (("a", a, ia), ("b", b, ib)):
        for name in ("part", "uid", "rank", "phash"):
            cols[f"{side}_{name}"] = src[name][idx]
    return pa.table(cols, schema=EDGE_SCHEMA)


def exact_edges(records: pa.Table) -> pa.Table:
    """Star edges from the first member (by uid, then part) of each group of equal (kind, key)."""
    cols = {name: records.column(name).to_numpy() for name in EXACT_SCHEMA.names}
    found = [EDGE_SCHEMA.empty_table()]
    for kind in (SHA, URL):
        mine = np.flatnonzero(cols["kind"] == kind)
        if len(mine) < 2:
            continue
        key = cols["key"][mine]
        order = np.argsort(key)  # not stable, and need not be: only the groups count here
        equal = key[order[1:]] == key[order[:-1]]
        members = mine[order[np.r_[False, equal] | np.r_[equal, False]]]  # the few with a twin
        members = members[np.lexsort((cols["part"][members], cols["uid"][members], cols["key"][members]))]
        same = np.r_[False, cols["key"][members[1:]] == cols["key"][members[:-1]]]
        first = np.maximum.accumulate(np.where(same, 0, np.arange(len(same))))
        later = np.flatnonzero(same)
        found.append(_edges(kind, cols, cols, members[first[later]], members[later]))
    return pa.concat_tables(found)


@numba.njit(cache=True)
def _per_distinct_hash(of, count, part, uid, blocks):
    """For each distinct hash: its first corpus image (-1 if none), its number of corpus images, its
    evaluation image (the smallest set, then index; -1 if none) and its block mask."""
    first_corpus = np.full(count, -1, np.int64)
    n_corpus = np.zeros(count, np.int64)
    evaluation = np.full(count, -1, np.int64)
    mask = np.zeros(count, np.uint32)
    for x in range(len(of)):
        h = of[x]
        mask[h] = blocks[x]  # the same in every record of a hash: its buckets depend on the hash alone
        if part[x] >= 0:
            n_corpus[h] += 1
            if first_corpus[h] < 0:
                first_corpus[h] = x
        else:
            e = evaluation[h]
            if e < 0 or -part[x] < -part[e] or (part[x] == part[e] and uid[x] < uid[e]):
                evaluation[h] = x
    return first_corpus, n_corpus, evaluation, mask


def near_edges(records: pa.Table, radius: int, r: int) -> tuple[pa.Table, pa.Table]:
    """Edges between corpus images whose pHashes are within the radius, and hits of corpus images
    on evaluation images, among one bucket's band records (each image once)."""
    if records.num_rows == 0:
        return EDGE_SCHEMA.empty_table(), HIT_SCHEMA.empty_table()
    nodes = {name: records.column(name).to_numpy() for name in BAND_SCHEMA.names}
    corpus = nodes["part"] >= 0
    # Identical hashes collapse to one first: a pile of identical images (blank, placeholder) then
    # costs O(n), not O(n^2) comparisons.
    reps, rep_of_node = collapse_identical(nodes["phash"])
    first_corpus, n_corpus, eval_of_rep, rep_blocks = _per_distinct_hash(
        rep_of_node, len(reps), nodes["part"], nodes["uid"], nodes["blocks"])
    # Identical hashes: a star from the first corpus image.
    star = np.flatnonzero(corpus)
    lead = first_corpus[rep_of_node[star]]
    later = lead != star
    # Distinct hashes within the radius, each pair once.
    ra, rb = close_pairs(reps, rep_blocks, radius, r) if radius else (np.zeros(0, np.int64),) * 2
    d = np.bitwise_count(reps[ra] ^ reps[rb]).astype(np.int32)
    both = (first_corpus[ra] >= 0) & (first_corpus[rb] >= 0)
    edges = _edges(NEAR, nodes, nodes, np.r_[lead[later], first_corpus[ra][both]],
                   np.r_[star[later], first_corpus[rb][both]])

    # Hits: every corpus image of a hash that is (or is within the radius of) an evaluation image's.
    hr = [np.flatnonzero((eval_of_rep >= 0) & (n_corpus > 0))]
    he, hd = [eval_of_rep[hr[0]]], [np.zeros(len(hr[0]), np.int32)]
    for x, y in ((ra, rb), (rb, ra)):
        sel = (eval_of_rep[y] >= 0) & (n_corpus[x] > 0)
        hr.append(x[sel])
        he.append(eval_of_rep[y][sel])
        hd.append(d[sel])
    hr, he, hd = np.concatenate(hr), np.concatenate(he), np.concatenate(hd)
    # Expand each hit to its hash's corpus images (few: sort just those).
    hit = np.zeros(len(reps), bool)
    hit[hr] = True
    images = np.flatnonzero(corpus & hit[rep_of_node])
    images = images[np.argsort(rep_of_node[images], kind="stable")]
    counts = n_corpus[hr]
    starts = np.searchsorted(rep_of_node[images], hr)
    corpus_nodes = images[np.repeat(starts, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)]
    ev = np.repeat(he, counts)
    hits = pa.table({"part": pa.array(nodes["part"][corpus_nodes], pa.int32()), "uid": nodes["uid"][corpus_nodes],
                     "distance": pa.array(np.repeat(hd, counts), pa.int32()),
                     "eval_set": pa.array(-nodes["part"][ev] - 1, pa.int32()), "eval_index": nodes["uid"][ev]},
                    schema=HIT_SCHEMA)
    return edges, hits


def bucket_part(shuffle: str, bucket: int, radius: int, r: int, outputs: dict) -> dict:
    """Step 2: one bucket's duplicate edges and evaluation hits."""
    exact = exact_edges(read_bucket(shuffle, bucket, EXACT_SCHEMA, ".exact"))
    near, hits = near_edges(read_bucket(shuffle, bucket, BAND_SCHEMA, ".near"), radius, r)
    edges = pa.concat_tables([exact, near])
    write_parquet(edges, outputs["edges"], compression="none")
    write_parquet(hits, outputs["hits"], compression="none")
    return {"edges": edges.num_rows, "hits": hits.num_rows}


# --- step 3: group --------------------------------------------------------------------------------


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def group(edges: list[str], hits: list[str], eval_names: list[str], eval_ids: list[str], output: str) -> dict:
    """Step 3: connected groups of the duplicate edges, their keepers, and every removed image's
    decision, sorted by partition. Memory is a few dozen bytes per edge: plain arrays, no strings
    until the decisions are written."""
    sizes = [parquet_file(path).metadata.num_rows for path in edges]
    e = sum(sizes)
    c = {f.name: np.empty(e, f.type.to_pandas_dtype()) for f in EDGE_SCHEMA}
    for path, start, size in zip(edges, np.cumsum([0] + sizes), sizes):  # a bucket's table at a time
        table = read_table(path)
        for name, column in c.items():
            column[start: start + size] = table.column(name).to_numpy()
    del table
    # A node is a corpus image (uids are unique across the corpus), numbered in uid order.
    ends = np.r_[c["a_uid"], c["b_uid"]]
    by_uid = np.argsort(ends)  # not stable, and need not be: every end of a node says the same
    is_new = np.r_[True, ends[by_uid[1:]] != ends[by_uid[:-1]]] if e else np.zeros(0, bool)
    first = by_uid[is_new]
    uids = ends[first]
    node_of_end = np.empty(2 * e, np.int64)
    node_of_end[by_uid] = np.cumsum(is_new) - 1
    del ends, by_uid, is_new

    def of_node(name: str) -> np.ndarray:
        a_side = first < e
        out = np.empty(len(first), c[f"a_{name}"].dtype)
        out[a_side] = c[f"a_{name}"][first[a_side]]
        out[~a_side] = c[f"b_{name}"][first[~a_side] - e]
        return out

    # Nodes renumbered in keeper order (rank, then uid): the keeper of a group is its first node.
    order = np.lexsort((uids, of_node("rank")))
    position = np.empty(len(order), np.int64)
    position[order] = np.arange(len(order))
    a, b = position[node_of_end[:e]], position[node_of_end[e:]]
    del node_of_end, position
    n = len(order)
    uids, part, phash = uids[order], of_node("part")[order], of_node("phash")[order]
    comp = _components(n, a, b)
    groups, keeper_of_comp = np.unique(comp, return_index=True)
    keeper = keeper_of_comp[comp]
    kind = c["kind"]
    sha_class = _components(n, a[kind == SHA], b[kind == SHA])
    url_class = _components(n, a[kind == URL], b[kind == URL])
    removed = np.flatnonzero(keeper != np.arange(n))
    k = keeper[removed]
    reason = np.where(sha_class[removed] == sha_class[k], 0, np.where(url_class[removed] == url_class[k], 1, 2))
    decisions = pa.table({"part": pa.array(part[removed], pa.int32()), "uid": u64_to_uid(uids[removed]),
                          "dup_of": u64_to_uid(uids[k]),
                          "reason": pa.DictionaryArray.from_arrays(
                              pa.array(reason, pa.int8()), REASONS).cast(pa.string()),
                          "distance": pa.array(np.bitwise_count(phash[removed] ^ phash[k]), pa.int32())},
                         schema=DECISION_SCHEMA)
    # Evaluation hits override: the nearest evaluation image, then the smallest (set, index).
    h = pa.concat_tables([read_table(p) for p in hits]) if hits else HIT_SCHEMA.empty_table()
    if h.num_rows:
        h = h.sort_by([("uid", "ascending"), ("distance", "ascending"), ("eval_set", "ascending"),
                       ("eval_index", "ascending")])
        hu = h.column("uid").to_numpy()
        h = h.filter(pa.array(np.r_[True, hu[1:] != hu[:-1]]))
        ids = [read_table(p).column("id").to_pylist() for p in eval_ids]
        labels = [f"{eval_names[s]}:{ids[s][i]}" for s, i in
                  zip(h.column("eval_set").to_pylist(), h.column("eval_index").to_pylist())]
        overlaps = pa.table({"part": h.column("part"), "uid": u64_to_uid(h.column("uid").to_numpy()),
                             "dup_of": pa.array(labels, pa.string()),
                             "reason": pa.array(["eval_overlap"] * h.num_rows, pa.string()),
                             "distance": h.column("distance")}, schema=DECISION_SCHEMA)
        overridden = np.isin(uids[removed], h.column("uid").to_numpy())
        decisions = pa.concat_tables([decisions.filter(pa.array(~overridden)), overlaps])
    decisions = decisions.sort_by([("part", "ascending"), ("uid", "ascending")])
    write_parquet(decisions, output, row_group_size=SLICE_ROW_GROUP)
    reasons = pc.value_counts(decisions.column("reason")).to_pylist() if decisions.num_rows else []
    return {"edges": e, "groups": len(groups), "removed": decisions.num_rows,
            **{x["values"]: x["counts"] for x in reasons}}


# --- step 4: per partition ------------------------------------------------------------------------


def decide_part(status: str, matched: str, decisions: str, part: int, outputs: dict) -> dict:
    t = survivors_input(status, matched)
    d = read_slice(decisions, part, ["uid", "dup_of", "reason", "distance"])
    index = pc.index_in(t.column("uid"), value_set=d.column("uid"))
    keep = pc.is_null(index)
    table = t.append_column("keep", keep)
    for name in ("dup_of", "reason", "distance"):
        table = table.append_column(name, d.column(name).take(index))
    table = table.set_column(table.num_columns - 1, "distance", pc.fill_null(table.column("distance"), 0))
    table = table.cast(DEDUP_SCHEMA)
    write_parquet(table, outputs["dedup"])
    write_parquet(query_counts(table.filter(keep).column("query_ids")), outputs["counts"])
    return {"images": table.num_rows, "kept": table.num_rows - d.num_rows}


# --- evaluation sets ------------------------------------------------------------------------------


def fashion_mnist_pixels(folder: str) -> np.ndarray:
    """Debian's dataset-fashion-mnist: the idx files of both splits, as (n, 28, 28) uint8."""
    arrays = []
    for split in ("train", "t10k"):
        path = folder.rstrip("/") + f"/{split}-images-idx3-ubyte.gz"
        try:
            data = gzip.decompress(storage.read_file(path))
        except FileNotFoundError:
            raise WitError("no Fashion-MNIST here (apt-get install dataset-fashion-mnist)", where=path) from None
        arrays.append(np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28))
    return np.concatenate(arrays)


def eval_hashes(kind: str, path: str) -> tuple[np.ndarray, list[str]]:
    """(pHashes, ids) of an evaluation set: an image folder, WebDataset tars, or Fashion-MNIST; on
    disk or under a prefix in a store."""
    from PIL import Image

    if kind == "fashion-mnist":
        pixels = fashion_mnist_pixels(path)
        small = np.stack([np.asarray(Image.fromarray(x).resize((SIDE, SIDE), Image.Resampling.LANCZOS))
                          for x in pixels])
        return phash_pixels(small), [f"train:{i}" if i < 60_000 else f"test:{i - 60_000}"
                                     for i in range(len(pixels))]
    blobs, ids = [], []
    files = storage.files_under(path)
    if kind == "folder":
        for f in files:
            if Path(f).suffix.lower() in IMAGE_SUFFIXES:
                blobs.append(storage.read_file(f))
                ids.append(f.removeprefix(path.rstrip("/") + "/"))
    elif kind == "webdataset":
        for t in (f for f in files if f.endswith(".tar")):
            with storage.open_input(t) as raw, tarfile.open(fileobj=raw) as tf:
                for member in tf:
                    if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                        blobs.append(tf.extractfile(member).read())
                        ids.append(f"{Path(t).name}:{member.name}")
    if not blobs:
        raise WitError(f"no images in this {kind} evaluation set", where=path)
    hashes, ok = phash_bytes(blobs)
    return hashes[ok], [i for i, good in zip(ids, ok) if good]


# --- the stage ------------------------------------------------------------------------------------


class EvalSetSettings(Section):
    """An evaluation set whose images (and their near duplicates) are kept out of the corpus."""

    name: str
    """The set's name: a removed image's `dup_of` is `NAME:ID`, its reason `eval_overlap`."""
    kind: Literal["folder", "webdataset", "fashion-mnist"]
    """`folder`: image files under a folder; `webdataset`: tar shards; `fashion-mnist`: the IDX files."""
    path: str
    """The set's folder or file, relative to the recipe."""


class DedupSettings(Section):
    """Exact and near-duplicate removal, and decontamination against evaluation sets."""

    radius: int = Field(default=4, ge=0, le=16)
    """Near duplicates: pHash Hamming distance <= radius (of 64 bits). The fast hash differs from a full-decode
    imagehash by about half a bit on average, well inside the default."""
    eval_sets: list[EvalSetSettings] = []
    """Evaluation sets to decontaminate against."""
    buckets: int = Field(default=0, ge=0)
    """Buckets of the dedup shuffle; 0: sized from the image count, about 4M hash records each (a
    bucket task then peaks near 1 GB)."""


FUNNEL = """
SELECT 'dedup ' || CASE WHEN keep THEN 'kept' ELSE 'removed' END AS step, reason, count(*) AS rows
FROM dedup GROUP BY keep, reason
"""


class DedupStage(Stage):
    name = "dedup"
    needs = ("download",)
    settings = DedupSettings
    provides = {"dedup": DEDUP_SCHEMA, "counts": COUNTS_SCHEMA}
    views = (View("dedup", "dedup/part-*.parquet"),)
    main_view = "dedup"
    funnel = FUNNEL
    kept = ("after dedup", "SELECT count(*) FROM dedup WHERE keep")

    def check_inputs(self, recipe: Recipe) -> list[str]:
        problems = []
        for e in recipe.dedup.eval_sets:
            path = recipe.path(e.path)
            try:
                found = storage.exists(path) if storage.is_object_url(str(path)) else path.exists()
            except WitError as err:
                problems.append(f"dedup.eval_sets {e.name}: {err}")
                continue
            if not found:
                problems.append(f"dedup.eval_sets {e.name}: {path}: not found")
        return problems

    def empty_hint(self, probe) -> str | None:
        return None if probe.count("dedup", "keep") else f"dedup removed every image: {probe.top('dedup', 'NOT keep')}"

    def plan(self, run: Run):
        up = self.needed(run, "download")
        parts = up.parts()
        d = run.recipe.dedup
        out = run.stage_dir(self.name)
        images = sum(p.info.get("success", 0) for p in parts)
        r = band_r(images, d.radius)
        buckets = d.buckets or max(1, -(-images * (d.radius + 1) // RECORDS_PER_BUCKET))
        eval_sets = [{"name": e.name, "kind": e.kind, "path": str(run.recipe.path(e.path))} for e in d.eval_sets]
        identities = []
        for e in eval_sets:
            identities.append([file_identity(f) for f in storage.files_under(e["path"]) if storage.is_file(f)])
        settings = {"version": VERSION, "radius": d.radius, "r": r, "buckets": buckets}
        namespace = fingerprint({**settings, "upstream": up.fingerprint, "eval": eval_sets,
                                 "eval_files": identities, "format": SHUFFLE_FORMAT})[:12]
        if (done := completed(run, self.name, namespace)) is not None:
            return done
        shuffle = out / "_shuffle" / namespace
        common = {"radius": d.radius, "r": r, "buckets": buckets, "shuffle": str(shuffle / "records")}
        maps = [self.task(run, part.key, map_part,
                          kwargs={"status": part.file("status"), "matched": part.file("matched"),
                                  "part": index, **common},
                          outputs=[], receipt=str(shuffle / "_done" / part.key),
                          inputs={**settings, "upstream": part.fingerprint, "part": index, "shuffle": namespace},
                          weight=part.info.get("success", 1) or 1)
                for index, part in enumerate(parts)]
        maps += [self.task(run, f"_eval-{i:03d}", map_eval,
                           kwargs={"index": i, "kind": e["kind"], "path": e["path"], **common,
                                   "ids_output": str(shuffle / "eval" / f"{i:03d}.parquet")},
                           outputs=[str(shuffle / "eval" / f"{i:03d}.parquet")],
                           inputs={**settings, "eval": e, "files": identities[i], "shuffle": namespace})
                 for i, e in enumerate(eval_sets)]
        yield maps
        mapped = combined_fingerprint(maps)
        yield [tracking_task(self, run, common["shuffle"], mapped,
                             [("{:06d}.exact", len(parts)), ("{:06d}.near", len(parts)), ("eval{:03d}.near", len(eval_sets))])]
        bucket_tasks = []
        for b in range(buckets):
            outputs = {"edges": str(bucket_folder(shuffle / "edges", b)) + ".parquet",
                       "hits": str(bucket_folder(shuffle / "hits", b)) + ".parquet"}
            bucket_tasks.append(self.task(
                run, f"_bucket-{b:05d}", bucket_part,
                kwargs={"shuffle": common["shuffle"], "bucket": b, "radius": d.radius, "r": r, "outputs": outputs},
                outputs=list(outputs.values()),
                inputs={"maps": mapped, "bucket": b}))
        yield bucket_tasks
        decisions = str(out / "decisions.parquet")
        grouping = self.task(run, "_group", group,
                        kwargs={"edges": [t.kwargs["outputs"]["edges"] for t in bucket_tasks],
                                "hits": [t.kwargs["outputs"]["hits"] for t in bucket_tasks],
                                "eval_names": [e["name"] for e in eval_sets],
                                "eval_ids": [t.outputs[0] for t in maps[len(parts):]],
                                "output": decisions},
                        outputs=[decisions], inputs={"buckets": combined_fingerprint(bucket_tasks)})
        yield [grouping]
        writes = []
        for index, part in enumerate(parts):
            key = part.key
            outputs = {"dedup": str(out / f"part-{key}.parquet"), "counts": str(out / "counts" / f"part-{key}.parquet")}
            writes.append(self.task(
                run, f"{key}.decide", decide_part,
                kwargs={"status": part.file("status"), "matched": part.file("matched"),
                        "decisions": decisions, "part": index, "outputs": outputs},
                outputs=list(outputs.values()),
                inputs={"version": VERSION, "upstream": part.fingerprint, "group": grouping.fingerprint,
                        "part": index},
                weight=part.info.get("success", 1) or 1))
        yield writes
        total = str(out / "query_counts.parquet")
        reduce = yield from sum_counts_steps(self, run, writes, total)
        infos = step_info(writes)
        return Manifest(self.name, [p.entry(t, t.kwargs["outputs"], {"images": i.get("images", 0), "kept": i.get("kept", 0)})
                                    for t, p, i in zip(writes, parts, infos)],
                        {"counts": total},
                        fingerprint([combined_fingerprint(writes), reduce.fingerprint]),
                        plan=namespace, scratch=[str(out / "_shuffle"), str(sums_folder(total))])
