"""Shards: WebDataset tars of the balanced corpus, shuffled globally, ready for open_clip's trainer.

Each sample is `{key}.jpg` (or the stored encoding), `{key}.txt` (the caption) and `{key}.json` (uid,
url, page_url, query ids and strings, width, height, sha256, phash, origin). The order across all
shards is a hash of (uid, seed), so a trainer reading shards in sequence still sees mixed queries, and
the same recipe gives the same shards.

A shuffle, so that every image byte is read once and written once:
1. Scatter, per balanced partition: the kept samples, image bytes included, go to S buckets by their
   rank (the hash of uid and seed). Buckets cut the rank range in order, so bucket 0 holds the
   smallest ranks, and the buckets in order are the global order.
2. One task per bucket: order its samples by rank and cut them into n equal shards, numbered
   b * n ... b * n + n - 1. S and n are planned from the kept counts in balance's manifest: n so that
   a shard holds at most about `samples_per_shard` samples and `max_shard_mb`.
3. The index: `sizes.json` (open_clip's convention), `shards.parquet` (uid -> shard, for DuckDB) and
   `wids.json` (a wids shard index).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from wit_builder import workspace
from wit_builder.ids import fingerprint
from wit_builder.recipe import Section
from wit_builder.runner import Manifest, combined_fingerprint, completed, partition_entry
from wit_builder.shuffle import FORMAT as SHUFFLE_FORMAT
from wit_builder.shuffle import (
    bucket_folder,
    bucket_of,
    bucket_writer,
    read_bucket,
    splitmix64,
    tracking_task,
    uid_to_u64,
)
from wit_builder.stage import Stage, View
from wit_builder.tar import safe_key, write_shard
from wit_builder.workspace import Run, atomic_write_bytes, count_requests, parquet_file, parquet_writer, read_table

VERSION = 3  # 3: each sample's json is built by DuckDB (compact separators)
BUCKET_BYTES = 256 << 20  # a bucket task holds its bucket in memory to order it
CHUNK_BYTES = 128 << 20  # a scatter task holds this much image data at a time
SAMPLE_OVERHEAD = 2048  # three tar headers, padding, the caption and the json, roughly

SAMPLE_SCHEMA = pa.schema([("rank", pa.uint64()), ("uid", pa.string()), ("image", pa.binary()),
                           ("text", pa.string()), ("json", pa.binary()), ("query_ids", pa.list_(pa.int32())),
                           ("bytes", pa.int64()), ("width", pa.int32()), ("height", pa.int32())])
INDEX_SCHEMA = pa.schema([("uid", pa.string()), ("query_ids", pa.list_(pa.int32())), ("bytes", pa.int64()),
                          ("width", pa.int32()), ("height", pa.int32()), ("shard", pa.string())])


def sample_rank(uids, seed: int) -> np.ndarray:
    """The global shard order: a hash of (uid, seed)."""
    return _rank(uid_to_u64(uids), seed)


def _rank(u: np.ndarray, seed: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return splitmix64(u ^ splitmix64(np.uint64(seed)))


# Each sample's `.json`, built for a whole chunk at once by DuckDB: to_json writes a struct's fields in
# their declared order, so declaring them sorted gives json.dumps(sort_keys=True)'s key order. It writes
# UTF-8 unescaped (ensure_ascii=False's text) and escapes quotes, backslashes and control characters;
# separators are compact.
_RECORD = {"uid": "uid", "url": "url", "page_url": "page_url", "query_ids": "query_ids", "queries": "queries",
           "width": "width", "height": "height", "sha256": "sha256", "phash": "printf('%016x', phash)",
           "origin": "origin"}
RECORD_SQL = ("SELECT to_json(struct_pack(" + ", ".join(f"{k} := {v}" for k, v in sorted(_RECORD.items()))
              + ")) AS json FROM samples")


def sample_records(con, m: pa.Table, query_strings: pa.Array) -> pa.Array:
    """The `.json` of every row of `m` (balance's columns), as one binary array in m's order."""
    lists = m.column("query_ids").combine_chunks()
    # Every sample's query strings at once: the ids, flattened, through the query list, then cut back
    # into lists by the ids' lengths (a null list of ids has no strings: []).
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())
    queries = pa.ListArray.from_arrays(offsets, query_strings.take(lists.flatten()))
    con.register("samples", pa.table({"uid": m.column("uid"), "url": m.column("url"),
                                      "page_url": m.column("page_url"), "query_ids": lists, "queries": queries,
                                      "width": m.column("width"), "height": m.column("height"),
                                      "sha256": m.column("sha256"), "phash": m.column("phash"),
                                      "origin": m.column("origin")}))
    try:
        # Results keep the scan's order (DuckDB's preserve_insertion_order, on by default).
        records = con.sql(RECORD_SQL).to_arrow_table().column("json")
    finally:
        con.unregister("samples")
    return records.combine_chunks().cast(pa.binary())


def scatter_part(balanced: str, images: str, queries: str, part: int, seed: int, buckets: int,
                 shuffle: str) -> dict:
    """Step 1: one partition's kept samples, with their image bytes, into the shard buckets: a chunk of
    about CHUNK_BYTES of images at a time, all into one data file and its index."""
    import duckdb

    meta = read_table(balanced, filters=[("keep", "=", True)])
    query_strings = read_table(queries, columns=["query"]).column("query").combine_chunks()
    con = duckdb.connect(config={"threads": 1})  # one per task; tasks already fill the cores
    samples = 0

    def scatter_chunk(chunk: list[pa.Table], rows_of: list[pa.Array], write) -> None:
        nonlocal samples
        table = pa.concat_tables(chunk)
        uid = table.column("uid")
        m = meta.take(pa.concat_arrays(rows_of))
        u = uid_to_u64(uid)
        rank = _rank(u, seed)
        rows = pa.table({"rank": rank, "uid": uid, "image": table.column("image"), "text": m.column("text"),
                         "json": sample_records(con, m, query_strings), "query_ids": m.column("query_ids"),
                         "bytes": m.column("bytes"), "width": m.column("width"), "height": m.column("height")},
                        schema=SAMPLE_SCHEMA)
        rows = rows.take(pa.array(np.lexsort((u, rank))))
        write(rows, bucket_of(rows.column("rank").to_numpy(), buckets))
        samples += rows.num_rows

    try:
        with bucket_writer(shuffle, f"{part:06d}", buckets, compression="lz4") as write:
            if meta.num_rows:
                file = parquet_file(images)
                count_requests(1 + file.metadata.num_row_groups)  # the uid column, then each row group's images
                # Each image row's row in meta (null: not kept), joined once for the whole file.
                where = pc.index_in(file.read(columns=["uid"]).column("uid"),
                                    value_set=meta.column("uid")).combine_chunks()
                chunk, rows_of, chunk_bytes, start = [], [], 0, 0
                for batch in file.iter_batches(batch_size=1024, columns=["uid", "image"]):
                    at = where.slice(start, batch.num_rows)
                    start += batch.num_rows
                    kept = at.is_valid()
                    batch = pa.Table.from_batches([batch]).filter(kept)
                    chunk.append(batch)
                    rows_of.append(at.filter(kept))
                    chunk_bytes += batch.nbytes
                    if chunk_bytes >= CHUNK_BYTES:
                        scatter_chunk(chunk, rows_of, write)
                        chunk, rows_of, chunk_bytes = [], [], 0
                if chunk:
                    scatter_chunk(chunk, rows_of, write)
    finally:
        con.close()
    if samples != meta.num_rows:
        raise RuntimeError(f"{meta.num_rows - samples} kept samples have no image in {images}")
    return {"samples": samples}


def bucket_shards(shuffle: str, bucket: int, shards: list[str], ext: str, index: str) -> dict:
    """Step 2: one bucket's samples in rank order, cut into len(shards) equal shards."""
    rows = read_bucket(shuffle, bucket, SAMPLE_SCHEMA)
    order = np.lexsort((uid_to_u64(rows.column("uid")), rows.column("rank").to_numpy()))
    cuts = [len(rows) * j // len(shards) for j in range(len(shards) + 1)]
    names = []
    for path, lo, hi in zip(shards, cuts, cuts[1:]):
        part = rows.take(pa.array(order[lo:hi], pa.int64()))  # one shard's copy at a time
        samples = zip(map(safe_key, part.column("uid").to_pylist()), part.column("image").to_pylist(),
                      part.column("text").to_pylist(), part.column("json").to_pylist())
        write_shard(path, samples, ext)
        names += [Path(path).name] * (hi - lo)
    table = rows.select(["uid", "query_ids", "bytes", "width", "height"]).take(pa.array(order, pa.int64())).append_column(
        "shard", pa.array(names, pa.string()))
    with parquet_writer(index, INDEX_SCHEMA) as w:
        w.write_table(table.sort_by([("shard", "ascending"), ("uid", "ascending")]))
    return {"samples": len(rows)}


def write_index(indexes: list[str], shards: list[str], out_dir: str) -> dict:
    """Step 3: sizes.json, wids.json and shards.parquet, streaming one bucket's index at a time."""
    out = Path(out_dir)
    counts = dict.fromkeys((Path(s).name for s in shards), 0)
    with parquet_writer(out / "shards.parquet", INDEX_SCHEMA) as w:
        for path in indexes:
            table = read_table(path)
            for shard, n in zip(*np.unique(np.array(table.column("shard").to_pylist(), dtype=object).astype(str),
                                           return_counts=True)):
                counts[str(shard)] += int(n)
            w.write_table(table)
    atomic_write_bytes(out / "sizes.json", json.dumps(counts, indent=1).encode())
    for stale in workspace.glob(out, "*.tar"):  # shards of an earlier plan with more of them
        if stale.name not in counts:
            workspace.remove(stale)
    wids = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": out.parent.name,
            "shardlist": [{"url": name, "nsamples": n} for name, n in counts.items()]}
    atomic_write_bytes(out / "wids.json", json.dumps(wids, indent=1).encode())
    return {"shards": len(shards), "samples": sum(counts.values())}


def shard_layout(kept: int, kept_bytes: int, per_shard: int, max_bytes: int, buckets: int = 0) -> tuple[int, int]:
    """(buckets, shards per bucket) for `kept` samples of `kept_bytes` image bytes."""
    total_bytes = kept_bytes + SAMPLE_OVERHEAD * kept
    buckets = buckets or max(1, math.ceil(total_bytes / BUCKET_BYTES))
    # A bucket gets kept / buckets samples give or take a few percent: leave room for that.
    slack = 1.0 if buckets == 1 else 1.1
    per_bucket = max(math.ceil(kept * slack / buckets / per_shard), math.ceil(total_bytes * slack / buckets / max_bytes), 1)
    return buckets, per_bucket


class ShardSettings(Section):
    """The WebDataset tar shards."""

    samples_per_shard: int = Field(default=10_000, ge=1)
    """Samples per shard, at most about (the shard is cut sooner at max_shard_mb)."""
    max_shard_mb: float = Field(default=1024.0, gt=0)
    """MB per shard, at most about (the shard is cut sooner at samples_per_shard)."""
    buckets: int = Field(default=0, ge=0)
    """Buckets of the shard shuffle (each holds its samples in memory to order them); 0: sized from the kept
    bytes, about 256 MB each."""


class ShardStage(Stage):
    name = "shards"
    needs = ("balance", "queries")
    settings = ShardSettings
    views = (View("shards", "shards/shards.parquet"),)
    main_view = "shards"
    funnel = "SELECT 'sharded' AS step, NULL AS reason, count(*) AS rows FROM shards"
    kept = ("sharded", "SELECT count(*) FROM shards")

    def plan(self, run: Run):
        up = self.needed(run, "balance")
        query_list = self.needed(run, "queries")
        parts = up.parts()
        s, seed, ext = run.recipe.shards, run.recipe.run.seed, run.recipe.download.encode_format
        kept = sum(p.info.get("kept", 0) for p in parts)
        kept_bytes = sum(p.info.get("kept_bytes", 0) for p in parts)
        buckets, per_bucket = shard_layout(kept, kept_bytes, s.samples_per_shard, int(s.max_shard_mb * (1 << 20)),
                                           s.buckets)
        out = run.stage_dir(self.name)
        settings = {"version": VERSION, "buckets": buckets, "per_bucket": per_bucket, "seed": seed, "ext": ext}
        namespace = fingerprint({**settings, "upstream": up.fingerprint, "queries": query_list.fingerprint,
                                 "format": SHUFFLE_FORMAT})[:12]
        if (done := completed(run, self.name, namespace)) is not None:
            return done
        shuffle = out / "_shuffle" / namespace
        queries = query_list.output("queries")
        scatters = [self.task(run, part.key, scatter_part,
                              kwargs={"balanced": part.file("balanced"), "images": part.file("images"),
                                      "queries": queries, "part": index, "seed": seed, "buckets": buckets,
                                      "shuffle": str(shuffle / "samples")},
                              outputs=[], inputs={**settings, "upstream": part.fingerprint, "shuffle": namespace},
                              weight=part.info.get("kept_bytes", 1) or 1, receipt=str(shuffle / "_done" / part.key))
                    for index, part in enumerate(parts)]
        yield scatters
        if kept == 0:
            buckets = 0
        scattered = combined_fingerprint(scatters)
        if buckets:
            yield [tracking_task(self, run, shuffle / "samples", scattered, [("{:06d}", len(parts))])]
        tasks = []
        for b in range(buckets):
            shards = [str(out / f"{b * per_bucket + j:06d}.tar") for j in range(per_bucket)]
            index = str(bucket_folder(shuffle / "index", b)) + ".parquet"
            tasks.append(self.task(run, f"_bucket-{b:05d}", bucket_shards,
                                   kwargs={"shuffle": str(shuffle / "samples"), "bucket": b, "shards": shards,
                                           "ext": ext, "index": index},
                                   outputs=shards + [index],
                                   inputs={"scatter": scattered, "bucket": b}, weight=per_bucket))
        yield tasks
        shards = [p for t in tasks for p in t.kwargs["shards"]]
        index_files = [str(out / n) for n in ("sizes.json", "wids.json", "shards.parquet")]
        reduce = self.task(run, "_reduce", write_index,
                           kwargs={"indexes": [t.kwargs["index"] for t in tasks], "shards": shards, "out_dir": str(out)},
                           outputs=index_files,
                           inputs={"version": VERSION, "buckets": combined_fingerprint(tasks)})
        yield [reduce]
        return Manifest(self.name, [partition_entry(t, {"shards": t.kwargs["shards"]}) for t in tasks],
                        {"index": index_files}, plan=namespace, scratch=[str(out / "_shuffle")])
