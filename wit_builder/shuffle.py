"""Shuffles by key: how every global step scales.

A map task scatters small records into B buckets by a hash of their key; then one task per bucket
reads that bucket's records from every map task, and nothing else. Records with equal keys always
meet in one bucket, so a bucket task sees everything it needs to decide about its keys, and its
memory is the bucket's share of the corpus, whatever the corpus size. This is the pattern of
MapReduce and of datatrove's MinHash dedup.

On disk, the layout of a sort-based shuffle: each map task writes two files whatever B is,
`<folder>/<map>.arrow` (Arrow IPC streams, one per bucket that has rows, per chunk the map wrote,
grouped by bucket within a chunk) and `<map>.index` (its non-empty spans: bucket, offset, length).
So the files grow with the map tasks, not with maps x buckets, and a map that writes in chunks
(bounded memory) still writes two.

Map-output tracking, as Spark's: between the maps and the buckets, one task (`track_outputs`) gathers
every map's spans into `<folder>/_outputs.parquet`, sorted by bucket in small row groups. A bucket
task reads its own rows of it (the footer and a row group or two: no listing, no per-map index),
then fetches only the non-empty spans, many at a time. A step's read requests grow as maps +
buckets + non-empty spans, never as maps x buckets.

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
from .workspace import atomic_path, atomic_write_bytes, read_table, write_parquet

FORMAT = "arrow-ipc-tracked"  # of the bucket files: part of each shuffle's namespace, so a rerun never mixes formats
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
    spans: list[tuple[int, int, int]] = []  # (bucket, offset, length) of each stream, in the order written
    with atomic_path(folder / f"{name}.arrow") as tmp, pa.OSFile(str(tmp), "wb") as data:
        def write(table: pa.Table, bucket: np.ndarray) -> None:
            order, sorted_buckets = sort_with_order(bucket, max(buckets - 1, 1).bit_length())
            starts = np.flatnonzero(np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]]) if len(order) \
                else np.zeros(0, np.int64)
            grouped = table.take(pa.array(order))  # one gather; each bucket's rows are then a slice
            for start, end in zip(starts.tolist(), np.r_[starts[1:], len(order)].tolist()):
                offset = data.tell()
                with pa.ipc.new_stream(data, table.schema, options=options) as stream:  # leaves data open
                    stream.write_table(grouped.slice(start, end - start))
                spans.append((int(sorted_buckets[start]), offset, data.tell() - offset))

        yield write
    atomic_write_bytes(folder / f"{name}.index", np.array(spans, np.int64).reshape(-1, 3).tobytes())


def scatter(table: pa.Table, bucket: np.ndarray, folder: str | Path, name: str, buckets: int,
            compression: str | None = None) -> None:
    """A map task's records, all at once, into `buckets` buckets (see bucket_writer)."""
    with bucket_writer(folder, name, buckets, compression) as write:
        write(table, bucket)


OUTPUTS = "_outputs.parquet"  # a shuffle's map-output tracking file
OUTPUTS_ROW_GROUP = 4096  # spans per row group: a bucket task reads few rows besides its own
OUTPUTS_SCHEMA = pa.schema([("bucket", pa.uint32()), ("map", pa.string()), ("offset", pa.int64()),
                            ("length", pa.int64())])


def map_names(maps: list[tuple[str, int]]) -> list[str]:
    """The names of a shuffle's map tasks, from (template, count) families such as ("{:06d}", 400):
    sorted, the order a bucket reads them in."""
    return sorted(template.format(i) for template, count in maps for i in range(count))


def track_outputs(folder: str, maps: list[tuple[str, int]]) -> dict:
    """The step between a shuffle's maps and its buckets: every map's non-empty spans, from their
    indexes (fetched together, by name: no listing, and no stale file of an earlier plan), into one
    file sorted by bucket, then map name, then the order the map wrote them (so a bucket's records
    come out the same whichever map finished first)."""
    names = map_names(maps)
    indexes = [Path(folder) / f"{name}.index" for name in names]
    bodies = workspace.read_many(indexes)
    spans = [np.frombuffer(bodies[str(index)], np.int64).reshape(-1, 3) for index in indexes]
    sizes = [len(s) for s in spans]
    spans = np.concatenate(spans) if spans else np.zeros((0, 3), np.int64)
    order = np.argsort(spans[:, 0], kind="stable")  # maps in name order and spans in write order stay so
    map_of = np.repeat(np.arange(len(names)), sizes)[order]
    table = pa.table({"bucket": pa.array(spans[order, 0], pa.uint32()),
                      "map": pa.DictionaryArray.from_arrays(pa.array(map_of, pa.int32()), pa.array(names, pa.string())),
                      "offset": spans[order, 1], "length": spans[order, 2]})
    write_parquet(table.cast(OUTPUTS_SCHEMA), Path(folder) / OUTPUTS, row_group_size=OUTPUTS_ROW_GROUP)
    per_bucket = np.bincount(spans[:, 0], weights=spans[:, 2]) if len(spans) else np.zeros(1)
    return {"maps": len(names), "spans": len(spans),
            "largest_bucket": {"bucket": int(np.argmax(per_bucket)), "bytes": int(per_bucket.max())}}


def tracking_task(stage, run, folder: str | Path, mapped: str, maps: list[tuple[str, int]], key: str = "_outputs"):
    """The stage's task that runs `track_outputs` over `folder` once its maps (named by the
    (template, count) families `maps`, combined fingerprint `mapped`) are complete."""
    path = str(Path(folder) / OUTPUTS)
    return stage.task(run, key, track_outputs, kwargs={"folder": str(folder), "maps": maps}, outputs=[path],
                      inputs={"format": FORMAT, "maps": mapped, "names": maps, "folder": Path(folder).name})


def read_bucket(folder: str | Path, bucket: int, schema: pa.Schema, suffix: str = "") -> pa.Table:
    """Every map task's records for one bucket (maps named `*<suffix>`), in map-name order, then
    chunk order (so the result does not depend on which task finished first). Reads the shuffle's
    tracking file (see track_outputs), then only the spans that hold rows."""
    folder = Path(folder)
    spans = read_table(folder / OUTPUTS, columns=["map", "offset", "length"], filters=[("bucket", "=", bucket)])
    maps = spans.column("map").to_pylist()
    offsets, lengths = spans.column("offset").to_pylist(), spans.column("length").to_pylist()
    wanted: dict[str, list[tuple[int, int]]] = {}
    for name, offset, length in zip(maps, offsets, lengths):
        if name.endswith(suffix):
            wanted.setdefault(name, []).append((offset, length))
    blocks = workspace.read_spans([(folder / f"{name}.arrow", ranges) for name, ranges in wanted.items()])
    tables = [pa.ipc.open_stream(data).read_all() for file_blocks in blocks for data in file_blocks]
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
