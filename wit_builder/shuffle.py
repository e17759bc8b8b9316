"""Shuffles by key: how every global step scales.

A map task scatters small records into B bucket files by a hash of their key
(`<folder>/b00017/<map key>.arrow`, Arrow IPC: scratch that is written and read once); then one task per bucket reads that bucket's files, the
records of every map task whose keys hash there, and nothing else. Records with equal keys always
meet in one bucket, so a bucket task sees everything it needs to decide about its keys, and its
memory is the bucket's share of the corpus, whatever the corpus size. This is the pattern of
MapReduce and of datatrove's MinHash dedup.

Bucket folders live under a namespace named by the fingerprint of everything the map depends on, so
a bucket task never reads records of an earlier plan; a rerun map task overwrites its own files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .workspace import read_arrow, read_table, write_arrow

FORMAT = "arrow-ipc"  # of the bucket files: part of each shuffle's namespace, so a rerun never mixes formats
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing function (wrapping arithmetic on purpose): uniform hashes of any integers."""
    with np.errstate(over="ignore"):
        x = (np.asarray(x, np.uint64) + _GOLDEN).astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


_HEX = np.zeros(256, np.uint64)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint64)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint64)


def uid_to_u64(uids) -> np.ndarray:
    """The 16-hex-digit uids as the 64-bit numbers they spell (vectorised over the Arrow buffer)."""
    arr = pa.array(uids, pa.string()) if not isinstance(uids, (pa.Array, pa.ChunkedArray)) else uids
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.string())
    arr = arr.cast(pa.string())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset: arr.offset + n + 1]
    if n == 0:
        return np.zeros(0, np.uint64)
    if arr.null_count or not (np.diff(offsets) == 16).all():
        return np.fromiter((int(u, 16) for u in arr.to_pylist()), np.uint64, count=n)
    chars = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]: offsets[0] + 16 * n].reshape(n, 16)
    digits = _HEX[chars]
    out = np.zeros(n, np.uint64)
    for i in range(16):
        out = (out << np.uint64(4)) | digits[:, i]
    return out


def u64_to_uid(values: np.ndarray) -> pa.Array:
    """The inverse of uid_to_u64: 16 lowercase hex digits each, as an Arrow string array."""
    values = np.asarray(values, np.uint64)
    n = len(values)
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    chars = np.empty((n, 16), np.uint8)
    for i in range(16):  # a digit at a time: memory stays at 16 bytes per value
        chars[:, i] = digits[(values >> np.uint64(60 - 4 * i)) & np.uint64(15)]
    offsets = np.arange(0, 16 * n + 1, 16, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(chars))])


def string_hash64(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string (DuckDB's hash, vectorised). Only bucket placement and equality
    tests use it, so a different hash gives the same decisions."""
    import duckdb

    con = duckdb.connect()
    con.register("strings", pa.table({"s": values}))
    hashes = con.sql("SELECT hash(s) AS h FROM strings").to_arrow_table().column("h")
    return hashes.to_numpy().astype(np.uint64) if len(hashes) else np.zeros(0, np.uint64)


def bucket_of(hashes: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket numbers 0..buckets-1 from uniform 64-bit hashes, by a multiply-high: monotone in the
    hash, so buckets in order hold the hashes in order (what a global sort by hash needs)."""
    with np.errstate(over="ignore"):
        return ((np.asarray(hashes, np.uint64) >> np.uint64(32)) * np.uint64(buckets)) >> np.uint64(32)


def bucket_folder(folder: str | Path, bucket: int) -> Path:
    return Path(folder) / f"b{bucket:05d}"


def sort_with_order(key: np.ndarray, key_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, key[order]) of a stable sort of non-negative integer keys below 2**key_bits. Key and
    index packed in one word when they fit: numpy sorts plain words several times faster than it
    argsorts them."""
    n = len(key)
    index_bits = max(int(n - 1).bit_length(), 1)
    if key_bits + index_bits <= 64:
        packed = np.sort((np.asarray(key, np.uint64) << np.uint64(index_bits)) | np.arange(n, dtype=np.uint64))
        return (packed & np.uint64((1 << index_bits) - 1)).astype(np.int64), packed >> np.uint64(index_bits)
    order = np.argsort(key, kind="stable")
    return order, key[order]


def scatter(table: pa.Table, bucket: np.ndarray, folder: str | Path, name: str) -> dict[int, int]:
    """Write each bucket's rows of `table` to `<folder>/bNNNNN/<name>.arrow` (rows keep their
    order); buckets with no rows get no file. Returns {bucket: rows}."""
    order, sorted_buckets = sort_with_order(bucket, max(int(bucket.max()).bit_length(), 1) if len(bucket) else 1)
    starts = np.flatnonzero(np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]]) if len(order) else []
    ends = np.r_[starts[1:], len(order)] if len(order) else []
    written = {}
    for start, end in zip(starts, ends):
        b = int(sorted_buckets[start])
        write_arrow(table.take(pa.array(order[start:end])), bucket_folder(folder, b) / f"{name}.arrow")
        written[b] = int(end - start)
    return written


def read_bucket(folder: str | Path, bucket: int, schema: pa.Schema, suffix: str = "") -> pa.Table:
    """Every map task's records for one bucket (its files named `*<suffix>.arrow`), in map-name
    order (so the result does not depend on which task finished first)."""
    files = sorted(bucket_folder(folder, bucket).glob(f"*{suffix}.arrow"))
    tables = [read_arrow(f) for f in files if not f.name.startswith(".")]
    return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()


def read_slice(path: str | Path, part: int, columns: list[str] | None = None) -> pa.Table:
    """The rows of a `part`-sorted side table that belong to one partition. The file is sorted by
    part with small row groups, so the reader skips the other partitions' row groups by their
    statistics: a task reads O(its own share)."""
    return read_table(path, columns=columns, filters=[("part", "=", part)])


def sort_by_part(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.sort_by([("part", "ascending")] + [(k, "ascending") for k in keys])


SLICE_ROW_GROUP = 65_536  # rows per row group of a part-sorted side table


def take_by_uid(table: pa.Table, uids: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The rows of `table` in the order of `uids` (each uid present once in table)."""
    return table.take(pc.index_in(uids, value_set=table.column("uid")))
