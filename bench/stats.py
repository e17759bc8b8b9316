"""`wit stats` on a synthetic run with 10M rows per stage: how long every built-in report takes.

The reference is DuckDB's own time to count the rows of every view (a floor: each report reads at
least that), measured in the same run.

    .venv/bin/python bench/stats.py [--rows 10000000] [--smoke]

--smoke: 20,000 rows per stage and 1,000 queries (the test suite's check that it still runs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wit_builder import sql, stats


def strings(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar(prefix), pc.cast(pa.array(numbers), pa.string()), "")


def choice(rng, options: list, n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, len(options), n), pa.int32()),
                                          pa.array(options)).cast(pa.string())


def query_lists(rng, n: int, queries: int = 500_000) -> pa.Array:
    lengths = rng.integers(1, 4, n)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    values = np.minimum(rng.zipf(1.3, offsets[-1]) - 1, queries - 1).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def build(run: Path, n: int, parts: int = 10, q: int = 500_000) -> None:
    rng = np.random.default_rng(0)
    (run / "queries").mkdir(parents=True)
    pq.write_table(pa.table({"query_id": pa.array(np.arange(q), pa.int32()), "query": strings("q", np.arange(q)),
                             "sources": pa.array([["unigram"]] * q, pa.list_(pa.string()))}),
                   run / "queries/queries.parquet")
    per = n // parts
    for p in range(parts):
        ids = np.arange(p * per, (p + 1) * per)
        uid = strings("u", ids)
        url = pc.binary_join_element_wise(strings("http://d", ids % 5000), pa.scalar("/i.jpg"), "")
        ok = rng.random(per) < 0.8
        files = {
            "candidates": {"uid": uid, "url": url, "text": choice(rng, ["a red fox", "a dog on grass"], per)},
            "candidates/rejects": {"origin": uid, "reason": choice(rng, ["no_text", "duplicate", "data_uri"], per)},
            "filtered": {"uid": uid, "ok": pa.array(ok),
                         "reason": pa.array(np.where(ok, None, "too_short"), pa.string())},
            "matched": {"uid": uid, "url": url, "query_ids": query_lists(rng, per, q)},
            "download": {"uid": uid, "url": url,
                         "status": choice(rng, ["success", "success", "failed", "refused"], per),
                         "reason": choice(rng, ["http_404", "timeout", "private_address"], per),
                         "width": pa.array(rng.integers(32, 1024, per), pa.int32()),
                         "height": pa.array(rng.integers(32, 1024, per), pa.int32()),
                         "bytes": pa.array(rng.integers(1000, 100_000, per))},
            "balanced": {"uid": uid, "query_ids": query_lists(rng, per, q), "keep": pa.array(rng.random(per) < 0.5)},
        }
        # Only the successes' image bytes (a few bytes each here: no report reads them).
        success = np.flatnonzero(pc.equal(files["download"]["status"], "success").to_numpy(zero_copy_only=False))
        files["download/images"] = {"uid": uid.take(pa.array(success)),
                                    "sha256": strings("s", ids[success]),
                                    "image": pa.array([b"\xff\xd8"] * len(success), pa.binary())}
        # Dedup writes one part per partition (a shuffle's decisions, written back by partition).
        keep = rng.random(per) < 0.7
        files["dedup"] = {"uid": uid, "keep": pa.array(keep),
                          "reason": pa.array(np.where(keep, None, "exact_image"), pa.string())}
        for folder, columns in files.items():
            (run / folder).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(columns), run / folder / f"part-{p:03d}.parquet")
    all_ids = np.arange(parts * per)
    (run / "shards").mkdir()
    pq.write_table(pa.table({"uid": strings("u", all_ids), "shard": strings("", all_ids // 10_000),
                             "bytes": pa.array(rng.integers(1000, 100_000, len(all_ids)))}),
                   run / "shards/shards.parquet")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--queries", type=int, default=500_000)
    parser.add_argument("--smoke", action="store_true", help="--rows 20000 --queries 1000")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.queries = 20_000, 1_000
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "synthetic"
        t = time.perf_counter()
        build(run, args.rows, q=args.queries)
        print(f"synthetic run: {args.rows:,} rows per stage, built in {time.perf_counter() - t:.0f} s")
        con = sql.connect(run)
        t = time.perf_counter()
        for view in sql.views(con):
            con.execute(f"SELECT count(*) FROM {view}").fetchall()
        floor = time.perf_counter() - t
        t = time.perf_counter()
        timings = []
        for title, result in stats.run_reports(run):
            t1 = time.perf_counter()
            if isinstance(result, str):  # a view this synthetic run lacks: its layout is out of date
                sys.exit(f"report {title!r} did not run: {result}")
            result.fetchall()
            timings.append((time.perf_counter() - t1, title))
        total = time.perf_counter() - t
    print(f"  wit stats, every built-in report ({len(timings)}): {total:.2f} s; counting every view: "
          f"{floor:.2f} s")
    for seconds, title in sorted(timings, reverse=True)[:3]:
        print(f"    {seconds:5.2f} s  {title}")
    print(f"ratio: {total / floor:.1f}x the time to count every view (lower is better)")


if __name__ == "__main__":
    main()
