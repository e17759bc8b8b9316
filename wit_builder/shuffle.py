"""Shuffles by key: how every global step scales.

A map task scatters small records into B buckets by a hash of their key; then one task per bucket
reads that bucket's records from every map task, and nothing else. Records with equal keys always
meet in one bucket, so a bucket task sees everything it needs to decide about its keys, and its
memory is the bucket's share of the corpus, whatever the corpus size. This is the pattern of
MapReduce and of datatrove's MinHash dedup.

On disk, the layout of a sort-based shuffle: each map task writes two files whatever B is,
`<folder>/<map>.arrow` (Arrow IPC streams, one per bucket that has rows, per chunk the map wrote,
grouped by bucket within a chunk) and `<map>.index` (where each bucket's streams lie). A bucket task
reads one index entry and its byte ranges from each map task's files. So the files grow with the
map tasks, not with maps x buckets, and a map that writes in chunks (bounded memory) still writes two.

Shuffle folders live under a namespace named by the fingerprint of everything the map depends on, so
a bucket task never reads records of an earlier plan; a rerun map task overwrites its own files.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import workspace
from .workspace import atomic_path, atomic_write_bytes, read_table

FORMAT = "arrow-ipc-indexed"  # of the bucket files: part of each shuffle's namespace, so a rerun never mixes formats
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
    """Where a bucket task's own outputs go."""
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


@contextlib.contextmanager
def bucket_writer(folder: str | Path, name: str, buckets: int, compression: str | None = None):
    """Yield write(table, bucket): each call (a chunk) appends the table's rows, grouped by bucket and
    in their order within a bucket, to the map's data file. The data file and then its index appear
    when the block ends. `compression` ("lz4"): for records that compress, such as text and JSON
    (as Spark compresses its shuffle blocks); hashes do not."""
    options = pa.ipc.IpcWriteOptions(compression=compression)
    folder = Path(folder)
    spans = []  # per chunk: (buckets, 2) of (offset, length)
    with atomic_path(folder / f"{name}.arrow") as tmp, pa.OSFile(str(tmp), "wb") as data:
        def write(table: pa.Table, bucket: np.ndarray) -> None:
            order, sorted_buckets = sort_with_order(bucket, max(buckets - 1, 1).bit_length())
            starts = np.flatnonzero(np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]]) if len(order) \
                else np.zeros(0, np.int64)
            grouped = table.take(pa.array(order))  # one gather; each bucket's rows are then a slice
            span = np.zeros((buckets, 2), np.int64)
            for start, end in zip(starts.tolist(), np.r_[starts[1:], len(order)].tolist()):
                offset = data.tell()
                with pa.ipc.new_stream(data, table.schema, options=options) as stream:  # leaves data open
                    stream.write_table(grouped.slice(start, end - start))
                span[int(sorted_buckets[start])] = (offset, data.tell() - offset)
            spans.append(span)

        yield write
    table = np.stack(spans, axis=1) if spans else np.zeros((buckets, 0, 2), np.int64)  # bucket-major
    atomic_write_bytes(folder / f"{name}.index", np.array([buckets, len(spans)], np.int64).tobytes() + table.tobytes())


def scatter(table: pa.Table, bucket: np.ndarray, folder: str | Path, name: str, buckets: int,
            compression: str | None = None) -> None:
    """A map task's records, all at once, into `buckets` buckets (see bucket_writer)."""
    with bucket_writer(folder, name, buckets, compression) as write:
        write(table, bucket)


def read_bucket(folder: str | Path, bucket: int, schema: pa.Schema, suffix: str = "") -> pa.Table:
    """Every map task's records for one bucket (maps named `*<suffix>`), in map-name order, then
    chunk order (so the result does not depend on which task finished first)."""
    tables = []
    for index in workspace.glob(folder, f"*{suffix}.index"):
        if index.name.startswith("."):
            continue
        head = workspace.read_ranges(index, [(0, 16)])[0]
        buckets, chunks = np.frombuffer(head, np.int64)
        row = workspace.read_ranges(index, [(16 + bucket * int(chunks) * 16, int(chunks) * 16)], count=False)[0]
        spans = np.frombuffer(row, np.int64).reshape(-1, 2)
        spans = spans[spans[:, 1] > 0]
        if len(spans):
            for data in workspace.read_ranges(index.with_suffix(".arrow"), spans.tolist()):
                tables.append(pa.ipc.open_stream(data).read_all())
    return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()


def read_slice(path: str | Path, part: int, columns: list[str] | None = None) -> pa.Table:
    """The rows of a `part`-sorted side table that belong to one partition. The file is sorted by
    part with small row groups, so the reader skips the other partitions' row groups by their
    statistics: a task reads O(its own share)."""
    return read_table(path, columns=columns, filters=[("part", "=", part)])


SLICE_ROW_GROUP = 65_536  # rows per row group of a part-sorted side table


def take_by_uid(table: pa.Table, uids: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The rows of `table` in the order of `uids` (each uid present once in table)."""
    return table.take(pc.index_in(uids, value_set=table.column("uid")))
