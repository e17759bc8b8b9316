"""The bucketed near-duplicate search alone, end to end, on one core: N random 64-bit pHashes with
planted near copies (1-4 bits away), in partitions as the dedup stage maps them.

Timed (CPU seconds of this one process): each partition's band records scattered to bucket files
(`pipelines.dedup.band_records` + `wit_builder.shuffle.scatter`), then each bucket read back and
searched (`read_bucket` + `near_edges`), with the stage's own r and bucket count for N. Reference,
same hashes, same run: the in-memory, unbucketed multi-index search (`near_duplicate_pairs`, no
files). Goal at k = 4: >= 500,000 hashes/s per core (10M in <= 20 s of one core), recall 1.0.

    .venv/bin/python bench/neardup.py [--n 10000000] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.dedup.neardup import band_r, near_duplicate_pairs
from pipelines.dedup.stage import BAND_SCHEMA, RECORDS_PER_BUCKET, band_records, near_edges
from wit_builder.shuffle import read_bucket, scatter, track_outputs

GOAL = 500_000


def planted_hashes(n: int, near_rate: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hashes, copy, source): copy[j] is a near copy of source[j], 1 to 4 bits away."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64)
    copy = np.flatnonzero(rng.random(n) < near_rate)
    copy = copy[copy > 0]
    source = (rng.random(len(copy)) * copy).astype(np.int64)  # an earlier hash
    flips = np.zeros(len(copy), np.uint64)
    for k in range(4):  # 1 to 4 distinct bits
        bit = np.uint64(1) << rng.integers(0, 64, len(copy)).astype(np.uint64)
        flips |= np.where(rng.integers(0, 4, len(copy)) >= k, bit, np.uint64(0))
    flips[flips == 0] = 1
    for j, s, f in zip(copy.tolist(), source.tolist(), flips.tolist()):  # in order: chains resolve
        hashes[j] = hashes[s] ^ np.uint64(f)
    return hashes, copy, source


def bucketed_search(hashes: np.ndarray, partition: int, radius: int, folder: Path, r: int = 0
                    ) -> tuple[set, float, dict]:
    """Edges found through the shuffle, its CPU seconds, and its shape (r: the stage's choice if 0)."""
    n = len(hashes)
    r = r or band_r(n, radius)
    buckets = max(1, -(-n * (radius + 1) // RECORDS_PER_BUCKET))
    start = time.process_time()
    for p, lo in enumerate(range(0, n, partition)):
        h = hashes[lo: lo + partition]
        ids = np.arange(lo, lo + len(h), dtype=np.uint64)
        scatter(*band_records(h, np.full(len(h), p, np.int32), ids, ids, radius, r, buckets), folder, f"{p:06d}.near",
                buckets)
    track_outputs(str(folder), [("{:06d}.near", -(-n // partition))])
    found = []
    for b in range(buckets):
        edges, _ = near_edges(read_bucket(folder, b, BAND_SCHEMA, ".near"), radius, r)
        found.append(np.stack([edges.column("a_uid").to_numpy(), edges.column("b_uid").to_numpy()], 1))
    cpu = time.process_time() - start
    pairs = np.concatenate(found)
    return set(map(tuple, np.sort(pairs, axis=1).tolist())), cpu, {"r": r, "buckets": buckets}


def groups(pairs: set, n: int) -> np.ndarray:
    """Each hash's duplicate group, numbered by its smallest member: what dedup decides from."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b = (np.array(x, np.int64) for x in zip(*pairs)) if pairs else (np.zeros(0, np.int64),) * 2
    label = connected_components(coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n)), directed=False)[1]
    smallest = np.full(label.max() + 1, n, np.int64)
    np.minimum.at(smallest, label, np.arange(n))
    return smallest[label]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--partition", type=int, default=250_000, help="hashes per map task, as in bench/scale.py")
    ap.add_argument("--radius", type=int, default=4)
    ap.add_argument("--near-rate", type=float, default=0.05)
    ap.add_argument("--r", type=int, default=0, help="blocks two near hashes share (default: the dedup stage's)")
    ap.add_argument("--smoke", action="store_true", help="20,000 hashes in partitions of 2,500")
    a = ap.parse_args()
    if a.smoke:
        a.n, a.partition = 20_000, 2_500
    hashes, copy, source = planted_hashes(a.n, a.near_rate)
    folder = Path(tempfile.mkdtemp(prefix="wit-neardup-"))
    try:
        found, cpu, shape = bucketed_search(hashes, a.partition, a.radius, folder, a.r)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    start = time.process_time()
    i, j, _ = near_duplicate_pairs(hashes, a.radius, shape["r"])
    reference_cpu = time.process_time() - start
    reference = set(zip(i.tolist(), j.tolist()))
    label = groups(found, a.n)
    recall = float((label[copy] == label[source]).mean()) if len(copy) else 1.0  # planted pairs in one group
    rate = a.n / cpu
    print(f"{a.n:,} hashes, k = {a.radius}, r = {shape['r']}, {shape['buckets']} buckets, partitions of "
          f"{a.partition:,}: bucketed search {cpu:.2f} cpu s = {rate:,.0f} hashes/s per core "
          f"({rate / GOAL:.2f}x the goal of {GOAL:,}); in-memory reference {reference_cpu:.2f} cpu s")
    print(f"ratio: bucketed search time / in-memory reference time {cpu / reference_cpu:.2f}x")
    same = bool((label == groups(reference, a.n)).all())
    print(f"recall of the {len(copy):,} planted pairs: {recall:.4f}; pairs found: {len(found):,}, by the "
          f"reference: {len(reference):,} (a pile of identical hashes is a star, not all its pairs); the same "
          f"duplicate groups: {same}")
    if recall < 1.0 or not same:
        sys.exit("the bucketed search and the reference disagree")


if __name__ == "__main__":
    main()
