"""`wit stats` on a synthetic run with 10M rows per stage: how long every built-in report takes.

The reference is DuckDB's own time to count the rows of every view (a floor: each report reads at
least that), measured in the same run.

    .venv/bin/python bench/stats.py [--rows 10000000]
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

from wit_builder import sql, stats  # noqa: E402


def strings(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar(prefix), pc.cast(pa.array(numbers), pa.string()), "")


def choice(rng, options: list, n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, len(options), n), pa.int32()),
                                          pa.array(options)).cast(pa.string())


def query_lists(rng, n: int) -> pa.Array:
    lengths = rng.integers(1, 4, n)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    values = np.minimum(rng.zipf(1.3, offsets[-1]) - 1, 499_999).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def build(run: Path, n: int, parts: int = 10) -> None:
    rng = np.random.default_rng(0)
    q = 500_000
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
            "matched": {"uid": uid, "url": url, "query_ids": query_lists(rng, per)},
            "download": {"uid": uid, "url": url,
                         "status": choice(rng, ["success", "success", "failed", "refused"], per),
                         "reason": choice(rng, ["http_404", "timeout", "private_address"], per),
                         "width": pa.array(rng.integers(32, 1024, per), pa.int32()),
                         "height": pa.array(rng.integers(32, 1024, per), pa.int32()),
                         "bytes": pa.array(rng.integers(1000, 100_000, per))},
            "balanced": {"uid": uid, "query_ids": query_lists(rng, per), "keep": pa.array(rng.random(per) < 0.5)},
        }
        for folder, columns in files.items():
            (run / folder).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(columns), run / folder / f"part-{p:03d}.parquet")
    all_ids = np.arange(parts * per)
    keep = rng.random(len(all_ids)) < 0.7
    (run / "dedup").mkdir()
    pq.write_table(pa.table({"uid": strings("u", all_ids), "keep": pa.array(keep),
                             "reason": pa.array(np.where(keep, None, "exact_image"), pa.string())}),
                   run / "dedup/dedup.parquet")
    (run / "shards").mkdir()
    pq.write_table(pa.table({"uid": strings("u", all_ids), "shard": strings("", all_ids // 10_000),
                             "bytes": pa.array(rng.integers(1000, 100_000, len(all_ids)))}),
                   run / "shards/shards.parquet")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "synthetic"
        t = time.perf_counter()
        build(run, args.rows)
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
            if not isinstance(result, str):
                result.fetchall()
            timings.append((time.perf_counter() - t1, title))
        total = time.perf_counter() - t
    print(f"  wit stats, every built-in report: {total:.1f} s; counting every view: {floor:.1f} s "
          f"({total / floor:.1f}x)")
    for seconds, title in sorted(timings, reverse=True)[:3]:
        print(f"    {seconds:5.1f} s  {title}")


if __name__ == "__main__":
    main()
