"""Near-duplicate search over 64-bit hashes, sub-quadratic, with recall 1.0 within the radius.

Pigeonhole: cut the 64 bits into m = k + r blocks. Two hashes within Hamming distance k differ in at
most k blocks, so at least r blocks agree exactly, and the first of them is among the first k + 1. A
table is a choice of r blocks (a lead block and r - 1 later ones); two hashes are compared in a table
only when they agree on its blocks, and a pair is reported only by the first table it agrees on (its
first r agreeing blocks), so each pair is found once, in exactly one table. r = 2 suits up to about
100 million hashes; beyond, r = 3 makes the keys long enough (~27 bits) that random hashes rarely
share one, which costs more tables but far fewer comparisons (`band_r`).

The search is one compiled pass per lead block: hashes are grouped by their lead block, and within a
group each table is a counting sort by the table's key into about as many bins as members, then a
scan of each bin. Groups stay small enough for the cache, and no candidate pair is ever materialised.
"""

from __future__ import annotations

from itertools import combinations

import numba
import numpy as np


def blocks(m: int) -> list[tuple[int, int]]:
    """(shift, width) of m contiguous blocks covering 64 bits."""
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    out, shift = [], 64
    for w in widths:
        shift -= w
        out.append((shift, w))
    return out


def band_r(hashes: int, radius: int) -> int:
    """How many blocks two near hashes must share: more for bigger corpora, so that a key's random
    collisions stay rare. At k = 4 keys of 21, 27 and 32 bits in 15, 35 and 70 tables. Measured on
    one core (`bench/neardup.py`): r = 2 costs 0.7 us per hash at 10M and 40M hashes, r = 3 1.0 us;
    r = 2's chance comparisons grow with the corpus and catch up near 100M."""
    if radius == 0:
        return 1
    return min(2 if hashes < 100_000_000 else 3 if hashes < 200_000_000 else 4, radius + 1)


def tables(radius: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The bit mask of each of the radius + r blocks, and every table as its r block numbers, the lead
    block first (leads 0..radius: the first agreeing block of a close pair is one of them)."""
    cuts = blocks(radius + r)
    masks = np.array([((1 << width) - 1) << shift for shift, width in cuts], np.uint64)
    rows = [(lead, *later) for lead in range(radius + 1)
            for later in combinations(range(lead + 1, len(cuts)), r - 1)]
    return masks, np.array(rows, np.int64).reshape(len(rows), r)


@numba.njit(cache=True, inline="always")
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@numba.njit(cache=True, inline="always")
def _bin(key, bits):
    """One of 2**bits bins for a key: equal keys share a bin, others spread (a murmur3-style mix)."""
    if bits == 0:
        return 0
    key ^= key >> np.uint64(33)
    key *= np.uint64(0xFF51AFD7ED558CCD)
    key ^= key >> np.uint64(33)
    return np.int64(key >> np.uint64(64 - bits))


@numba.njit(cache=True, inline="always")
def _bit_length(x):
    bits = 0
    while x:
        x >>= 1
        bits += 1
    return bits


@numba.njit(cache=True, inline="always")
def _first_table_is(difference, masks, table):
    """Whether the first r blocks on which a pair agrees are exactly this table's blocks."""
    found = 0
    for c in range(len(masks)):
        if (difference & masks[c]) == 0:
            if c != table[found]:
                return False
            found += 1
            if found == len(table):
                return True
    return False


@numba.njit(cache=True)
def _group_by_lead(hashes, leads, bit, mask):
    """The hashes led by this block, grouped by its value (hashed into about n / 256 groups, at most
    2**11): their indices, their hashes side by side (so that the tables read them from the cache),
    and where each group starts."""
    n = len(hashes)
    led = 0
    for x in range(n):
        if leads[x] & bit:
            led += 1
    group_bits = min(11, max(0, _bit_length(led) - 8))
    group_of = np.empty(n, np.int64)
    starts = np.zeros((1 << group_bits) + 1, np.int64)
    for x in range(n):
        if leads[x] & bit:
            g = _bin(hashes[x] & mask, group_bits)
            group_of[x] = g
            starts[g + 1] += 1
    for g in range(1 << group_bits):
        starts[g + 1] += starts[g]
    fill = starts[:-1].copy()
    members = np.empty(led, np.int64)
    grouped = np.empty(led, np.uint64)
    for x in range(n):
        if leads[x] & bit:
            members[fill[group_of[x]]] = x
            grouped[fill[group_of[x]]] = hashes[x]
            fill[group_of[x]] += 1
    return members, grouped, starts


@numba.njit(cache=True)
def _pairs_in_table(group, table, masks, radius, keys, bins, order, counts, out_a, out_b, found):
    """Pairs of one group within the radius whose first agreeing blocks are this table's, written to
    out_a/out_b (positions in the group) from `found` on; the new count, or -1 when they are full."""
    size = len(group)
    table_mask = np.uint64(0)
    for c in range(len(table)):
        table_mask |= masks[table[c]]
    # A stable counting sort of the group by the table's key, into about as many bins as members.
    bin_bits = _bit_length(size - 1)
    counts[: (1 << bin_bits) + 1] = 0
    for q in range(size):
        keys[q] = group[q] & table_mask
        bins[q] = _bin(keys[q], bin_bits)
        counts[bins[q] + 1] += 1
    for b in range(1 << bin_bits):
        counts[b + 1] += counts[b]
    for q in range(size):
        order[counts[bins[q]]] = q
        counts[bins[q]] += 1
    start = 0  # counts[b] is now where bin b ends
    for b in range(1 << bin_bits):
        end = counts[b]
        for p in range(start, end):
            key = keys[order[p]]
            for q in range(p + 1, end):
                if keys[order[q]] != key:
                    continue
                difference = group[order[p]] ^ group[order[q]]
                if _popcount(difference) <= radius and _first_table_is(difference, masks, table):
                    if found == len(out_a):
                        return -1
                    out_a[found] = order[p]
                    out_b[found] = order[q]
                    found += 1
        start = end
    return found


@numba.njit(cache=True)
def _close_pairs(hashes, leads, masks, tables, radius):
    out_a = np.empty(4096, np.int64)
    out_b = np.empty(4096, np.int64)
    found = 0
    for lead in range(radius + 1):
        members, grouped, starts = _group_by_lead(hashes, leads, np.uint32(1) << np.uint32(lead), masks[lead])
        biggest = np.max(starts[1:] - starts[:-1]) if len(members) else 0
        if biggest < 2:
            continue
        keys = np.empty(biggest, np.uint64)
        bins = np.empty(biggest, np.int64)
        order = np.empty(biggest, np.int64)
        counts = np.empty((1 << _bit_length(biggest)) + 1, np.int64)
        for g in range(len(starts) - 1):
            lo, hi = starts[g], starts[g + 1]
            if hi - lo < 2:
                continue
            for t in range(len(tables)):
                if tables[t, 0] != lead:
                    continue
                before = found
                found = _pairs_in_table(grouped[lo:hi], tables[t], masks, radius, keys, bins, order, counts,
                                        out_a, out_b, before)
                while found < 0:  # out of room: grow and search this table again
                    out_a = np.concatenate((out_a, np.empty(len(out_a), np.int64)))
                    out_b = np.concatenate((out_b, np.empty(len(out_b), np.int64)))
                    found = _pairs_in_table(grouped[lo:hi], tables[t], masks, radius, keys, bins, order, counts,
                                            out_a, out_b, before)
                for f in range(before, found):  # positions in the group to indices into hashes
                    out_a[f] = members[lo + out_a[f]]
                    out_b[f] = members[lo + out_b[f]]
    return out_a[:found], out_b[:found]


@numba.njit(cache=True)
def collapse_identical(hashes):
    """(distinct, of): the distinct hashes in first-seen order, and each hash's index among them (an
    open-addressing table: linear time, where sorting to find them costs n log n)."""
    n = len(hashes)
    bits = _bit_length(2 * n)
    slots = np.full(1 << bits, -1, np.int64)
    distinct = np.empty(n, np.uint64)
    of = np.empty(n, np.int64)
    count = 0
    for x in range(n):
        s = _bin(hashes[x], bits)
        while True:
            seen = slots[s]
            if seen < 0:
                slots[s] = count
                distinct[count] = hashes[x]
                of[x] = count
                count += 1
                break
            if distinct[seen] == hashes[x]:
                of[x] = seen
                break
            s = (s + 1) & ((1 << bits) - 1)
    return distinct[:count], of


def close_pairs(hashes: np.ndarray, leads: np.ndarray, radius: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a < b) of hashes within the radius, each once. `leads` holds each hash's bit mask
    of the lead blocks it is searched under here (a dedup bucket holds each hash under the blocks that
    route it there; all k + 1 bits for a search of everything): a pair is found where its first
    agreeing block leads."""
    masks, rows = tables(radius, r)
    return _close_pairs(np.ascontiguousarray(hashes, np.uint64), np.ascontiguousarray(leads, np.uint32),
                        masks, rows, radius)


def near_duplicate_pairs(hashes: np.ndarray, k: int, r: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) for every pair i < j with Hamming distance <= k, in memory."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    r = min(r, k + 1) if r and k else band_r(len(hashes), k)
    i, j = close_pairs(hashes, np.full(len(hashes), (1 << (k + 1)) - 1, np.uint32), k, r)
    order = np.lexsort((j, i))
    i, j = i[order], j[order]
    return i, j, np.bitwise_count(hashes[i] ^ hashes[j]).astype(np.int32)


def brute_force_pairs(hashes: np.ndarray, k: int) -> set[tuple[int, int]]:
    """The obviously correct quadratic reference, for tests and the benchmark's recall check."""
    out = set()
    for i in range(len(hashes)):
        d = np.bitwise_count(hashes[i + 1 :] ^ hashes[i])
        for j in np.flatnonzero(d <= k):
            out.add((i, i + 1 + int(j)))
    return out
