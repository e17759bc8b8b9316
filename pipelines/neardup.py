"""Near-duplicate search over 64-bit hashes, sub-quadratic, with recall 1.0 within the radius.

Pigeonhole: cut the 64 bits into m = k + r blocks. Two hashes within Hamming distance k differ in at
most k blocks, so at least r blocks agree exactly. For each of the C(m, r) choices of r blocks, hashes
are sorted by those blocks and only hashes with the same key are compared. Each pair that agrees on r
blocks is found in at least one table, so none is missed. r = 2 suits up to about a million hashes;
beyond, r = 3 makes the keys long enough (~27 bits) that random hashes rarely share one, which costs
more tables but far fewer comparisons.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from wit_builder.shuffle import sort_with_order


def blocks(m: int) -> list[tuple[int, int]]:
    """(shift, width) of m contiguous blocks covering 64 bits."""
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    out, shift = [], 64
    for w in widths:
        shift -= w
        out.append((shift, w))
    return out


def pairs_within_runs(order: np.ndarray, keys_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (into the unsorted array) whose keys are equal."""
    starts = np.flatnonzero(np.r_[True, keys_sorted[1:] != keys_sorted[:-1]])
    lengths = np.diff(np.r_[starts, len(keys_sorted)])
    multi = lengths > 1
    starts, lengths = starts[multi], lengths[multi]
    if not len(starts):
        empty = np.zeros(0, np.int64)
        return empty, empty
    per = lengths * (lengths - 1) // 2
    run = np.repeat(np.arange(len(starts)), per)
    # Position of each pair inside its run, then (a, b) with a < b by inverting the triangular number.
    offset = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
    n = lengths[run]
    a = (2 * n - 1 - np.sqrt((2 * n - 1) ** 2 - 8 * offset)) // 2
    a = a.astype(np.int64)
    fix = a * (2 * n - a - 1) // 2 > offset  # float rounding at the edges
    a[fix] -= 1
    b = offset - a * (2 * n - a - 1) // 2 + a + 1
    base = starts[run]
    return order[base + a], order[base + b]


def pairs_sharing_blocks(hashes: np.ndarray, chosen) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs of hashes that agree exactly on the chosen (shift, width) blocks."""
    key, key_bits = np.zeros(len(hashes), np.uint64), 0
    for shift, width in chosen:
        key = (key << np.uint64(width)) | ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1))
        key_bits += width
    return pairs_within_runs(*sort_with_order(key, key_bits))


def close_pairs_led_by(hashes: np.ndarray, cuts: list[tuple[int, int]], first: int, r: int, radius: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs within the radius among hashes that agree on block `first` and on some r - 1
    later blocks: one sorted table per choice of later blocks. Each block sits in a fixed slot of a
    word above the hash's index, so a table's key is a few ORs of precomputed words, one in-place
    sort, and a scan for equal neighbours (chance ones are rare when the keys are long enough)."""
    n = len(hashes)
    slot = max(width for _, width in cuts)
    index_bits = max(int(n - 1).bit_length(), 1)
    tables = list(combinations(range(first + 1, len(cuts)), r - 1))
    if index_bits + r * slot > 64:  # a huge bucket: the general path
        found = [pairs_sharing_blocks(hashes, [cuts[c] for c in (first, *chosen)]) for chosen in tables]
        a = np.concatenate([x for x, _ in found] or [np.zeros(0, np.int64)])
        b = np.concatenate([y for _, y in found] or [np.zeros(0, np.int64)])
    else:
        placed = {}

        def in_slot(block: int, position: int) -> np.ndarray:
            if (block, position) not in placed:
                shift, width = cuts[block]
                placed[block, position] = ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)) \
                    << np.uint64(index_bits + position * slot)
            return placed[block, position]

        lead = in_slot(first, r - 1) | np.arange(n, dtype=np.uint64)
        index_mask = np.uint64((1 << index_bits) - 1)
        found_a, found_b = [], []
        key = np.empty(n, np.uint64)
        for chosen in tables:
            np.bitwise_or(lead, in_slot(chosen[0], 0), out=key)
            for position, block in enumerate(chosen[1:], 1):
                key |= in_slot(block, position)
            key.sort()
            blocks_only = key >> np.uint64(index_bits)
            equal = np.flatnonzero(blocks_only[1:] == blocks_only[:-1])
            if len(equal):
                members = np.sort(np.r_[equal, equal + 1])  # every hash with a twin, in sorted order
                members = members[np.r_[True, members[1:] != members[:-1]]]
                a, b = pairs_within_runs((key[members] & index_mask).astype(np.int64), blocks_only[members])
                found_a.append(a)
                found_b.append(b)
        a = np.concatenate(found_a) if found_a else np.zeros(0, np.int64)
        b = np.concatenate(found_b) if found_b else np.zeros(0, np.int64)
    close = np.bitwise_count(hashes[a] ^ hashes[b]) <= radius
    return a[close], b[close]


def near_duplicate_pairs(hashes: np.ndarray, k: int, r: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) for every pair i < j with Hamming distance <= k."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if r is None:
        r = 2 if n <= 1_500_000 else 3
    r = min(r, k + 1) if k else 1
    found_i, found_j = [], []
    for chosen in combinations(blocks(k + r), r):
        i, j = pairs_sharing_blocks(hashes, chosen)
        if len(i):
            close = np.bitwise_count(hashes[i] ^ hashes[j]) <= k
            found_i.append(i[close])
            found_j.append(j[close])
    if not found_i:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.int32)
    i = np.concatenate(found_i)
    j = np.concatenate(found_j)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    pairs = np.unique(np.stack([lo, hi], axis=1), axis=0) if len(lo) else np.zeros((0, 2), np.int64)
    lo, hi = pairs[:, 0], pairs[:, 1]
    return lo, hi, np.bitwise_count(hashes[lo] ^ hashes[hi]).astype(np.int32)


def brute_force_pairs(hashes: np.ndarray, k: int) -> set[tuple[int, int]]:
    """The obviously correct quadratic reference, for tests and the benchmark's recall check."""
    out = set()
    for i in range(len(hashes)):
        d = np.bitwise_count(hashes[i + 1 :] ^ hashes[i])
        for j in np.flatnonzero(d <= k):
            out.add((i, i + 1 + int(j)))
    return out
