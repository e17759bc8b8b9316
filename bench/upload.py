"""Shard upload to object storage: the shard writer with its run folder in a store (write the tar in
the local staging folder, upload it, drop the local copy: what a shard task does) against a raw
multipart put of the same bytes with the same client (s3fs `put_file` of the finished tar), to an S3
server on 127.0.0.1 (moto's, in a process of its own), alternately, same run.

    .venv/bin/python bench/upload.py [--shards 8] [--mb 64] [--repeats 3] [--smoke]

--smoke: 2 shards of 2 MB, once (the test suite's check that it still runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wit_builder import storage, workspace
from wit_builder.tar import write_samples, write_shard

IMAGE_BYTES = 60_000  # a 256-px JPEG, about


def samples(mb: float, seed: int) -> list[tuple[str, bytes, str, bytes]]:
    """Incompressible 'images' (random bytes) with a caption and metadata, `mb` megabytes in all."""
    rng = __import__("numpy").random.default_rng(seed)
    n = max(1, int(mb * 1e6 / IMAGE_BYTES))
    return [(f"{seed:04d}{i:08d}", rng.bytes(IMAGE_BYTES), "a caption", b"{}") for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--mb", type=float, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.shards, args.mb, args.repeats = 2, 2, 1
    shards = [samples(args.mb, s) for s in range(args.shards)]
    with storage.LocalS3() as s3, tempfile.TemporaryDirectory() as tmp:
        bucket = s3.bucket("wit-bench")
        fs, _ = storage.filesystem(bucket)
        staging = Path(tmp) / "staging"
        workspace.use_store(staging, f"{bucket}/run")
        # The raw put's files, written beforehand: it measures the upload alone.
        raw_files = []
        for i, rows in enumerate(shards):
            raw_files.append(Path(tmp) / f"raw-{i:06d}.tar")
            with open(raw_files[-1], "wb") as f:
                write_samples(f, rows, "jpg")
        total = sum(p.stat().st_size for p in raw_files)
        times: dict[str, list[float]] = {"raw put": [], "shard writer": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            for i, path in enumerate(raw_files):
                fs.put_file(str(path), f"{bucket}/raw/{i:06d}.tar")
            times["raw put"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for i, rows in enumerate(shards):
                write_shard(str(staging / "shards" / f"{i:06d}.tar"), rows, "jpg")
            times["shard writer"].append(time.perf_counter() - t)
        assert fs.cat_file(f"{bucket}/run/shards/000000.tar") == raw_files[0].read_bytes()
        assert not list(staging.rglob("*.tar")), "the staged shards were not removed"
    raw, ours = (statistics.median(times[k]) for k in times)
    print(f"{args.shards} shards of {total / args.shards / 1e6:.1f} MB to a local S3 server, median of {args.repeats}: "
          f"raw put {total / raw / 1e6:.0f} MB/s, shard writer {total / ours / 1e6:.0f} MB/s")
    print(f"ratio: {raw / ours:.2f}x a raw multipart put's throughput (goal: >= 0.8x)")


if __name__ == "__main__":
    main()
