"""The cross-partition duplicate shuffle: each partition scatters its keys, one task per bucket finds
the later copies and scatters them back by partition, so that the filter task of a partition reads
its own copies from the spans that hold them, not a file from every bucket."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from wit_builder.shuffle import (
    SLICE_ROW_GROUP,
    bucket_of,
    read_bucket,
    scatter,
    splitmix64,
    string_hash64,
    uid_to_u64,
)
from wit_builder.workspace import read_table, write_parquet


def scatter_keys(candidates: str, part: int, one_text_per_url: bool, buckets: int, shuffle: str) -> None:
    """A partition's side of the shuffle: (kind, key, part, row, uid, origin) of each of its rows,
    into the bucket of its key; `kind` 0 is the pair's uid, 1 the URL (with one_text_per_url)."""
    table = read_table(candidates, columns=["uid", "url", "origin"])
    keys = [pa.table({"kind": pa.array(np.zeros(table.num_rows, np.uint8)), "key": uid_to_u64(table.column("uid"))})]
    if one_text_per_url:
        keys.append(pa.table({"kind": pa.array(np.ones(table.num_rows, np.uint8)),
                              "key": string_hash64(table.column("url"))}))
    rows = pa.array(np.arange(table.num_rows, dtype=np.uint32))
    records = pa.concat_tables([k.append_column("part", pa.array(np.full(table.num_rows, part, np.uint32)))
                                .append_column("row", rows).append_column("uid", table.column("uid"))
                                .append_column("origin", table.column("origin")) for k in keys])
    key = records.column("key").to_numpy()
    bucket = bucket_of(splitmix64(key ^ records.column("kind").to_numpy().astype(np.uint64)), buckets)
    scatter(records, bucket, shuffle, f"{part:06d}", buckets, compression="lz4")  # uids and origins: text


KEY_SCHEMA = pa.schema([("kind", pa.uint8()), ("key", pa.uint64()), ("part", pa.uint32()),
                        ("row", pa.uint32()), ("uid", pa.string()), ("origin", pa.string())])
DUPLICATES_SCHEMA = pa.schema([("part", pa.uint32()), ("row", pa.uint32()), ("uid", pa.string()),
                               ("reason", pa.string()), ("first_origin", pa.string())])


def find_duplicates(shuffle: str, bucket: int, output: str, back: str, partitions: int) -> dict:
    """One bucket of the duplicate shuffle: the rows whose pair (uid) an earlier row already holds,
    and with one_text_per_url the later texts of a URL; earlier means by (partition, row). Written
    to `output` (for inspection) and scattered into `back` by partition (for the filter stage)."""
    records = read_bucket(shuffle, bucket, KEY_SCHEMA)
    records = records.sort_by([("kind", "ascending"), ("key", "ascending"), ("part", "ascending"),
                               ("row", "ascending")])
    kind, key = records.column("kind").to_numpy(), records.column("key").to_numpy()
    same = np.r_[False, (kind[1:] == kind[:-1]) & (key[1:] == key[:-1])]
    first = np.maximum.accumulate(np.where(same, 0, np.arange(len(same))))  # the run's first row
    later = np.flatnonzero(same)
    reason = np.where(kind[later] == 0, "duplicate", "same_url")
    table = pa.table({
        "part": records.column("part").take(pa.array(later)), "row": records.column("row").take(pa.array(later)),
        "uid": records.column("uid").take(pa.array(later)), "reason": pa.array(reason, pa.string()),
        "first_origin": records.column("origin").take(pa.array(first[later]))}, schema=DUPLICATES_SCHEMA)
    # A row that repeats both a pair and a URL is a `duplicate`: keep one reason per row.
    table = table.sort_by([("part", "ascending"), ("row", "ascending"), ("reason", "ascending")])
    if table.num_rows:
        p, r = table.column("part").to_numpy(), table.column("row").to_numpy()
        table = table.filter(pa.array(np.r_[True, (p[1:] != p[:-1]) | (r[1:] != r[:-1])]))
    write_parquet(table, output, row_group_size=SLICE_ROW_GROUP)
    scatter(table, table.column("part").to_numpy(), back, f"b{bucket:05d}", partitions, compression="lz4")
    return {"duplicates": table.num_rows}


def duplicates_of(back: str, part: int) -> pa.Table:
    """The later copies in one partition (row, reason), from the shuffle back by partition."""
    return read_bucket(back, part, DUPLICATES_SCHEMA).select(["row", "reason"])
