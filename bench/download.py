"""Download: raw img2dataset against the download stage (img2dataset behind the egress proxy, with
status rows, retries and image checks), same URL list, same local server, same run. Between them,
raw img2dataset through the egress proxy alone, so the overhead splits into the proxy's share and
the rest of the stage's. Each leg runs once untimed (the stage's first partition in a process starts
its hashing processes; img2dataset's first run imports its models), then `--repeats` times,
interleaved. Reported: each leg's median throughput, and the overhead as the median over rounds of
each round's time against raw img2dataset's in the same round (a paired ratio: on a shared machine
the load drifts between rounds by as much as the overhead, and a round's legs run within a
minute of each other), with the ratio of the medians beside it.

    .venv/bin/python bench/download.py [--samples N] [--threads 16 64] [--repeats 3] [--image photo] [--smoke]

--smoke: 40 URLs, 8 threads, one timed round (the test suite's check that it still runs).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.download.egress import EgressProxy
from pipelines.download.miniweb import MiniWeb
from pipelines.download.stage import (
    DownloadSettings,
    download_part,
    egress_environment,
    egress_policy,
    output_to,
)
from wit_builder.ids import uid


def raw_img2dataset(urls: list[str], out: Path, threads: int) -> float:
    import img2dataset

    src = out / "raw-input.parquet"
    pq.write_table(pa.table({"url": urls, "caption": ["a picture"] * len(urls)}), src)
    t = time.perf_counter()
    with output_to(out / "raw.log"):
        img2dataset.download(url_list=str(src), input_format="parquet", url_col="url", caption_col="caption",
                             output_format="parquet", output_folder=str(out / "raw"), processes_count=1,
                             thread_count=threads, timeout=10, image_size=256, resize_mode="keep_ratio",
                             resize_only_if_bigger=True, number_sample_per_shard=1000, extract_exif=False,
                             enable_wandb=False)
    return time.perf_counter() - t


def settings(threads: int) -> DownloadSettings:
    """The stage's default settings, but for the local server, and a per-host limit at the thread count:
    every URL here is on one host, so a lower limit would measure the politeness setting (which on a
    real crawl spreads over many hosts), not the guard; all legs run the same concurrency."""
    return DownloadSettings(thread_count=threads, per_host_connections=threads, allow_loopback=True,
                            timeout=10)


def proxied_img2dataset(urls: list[str], out: Path, threads: int) -> float:
    """Raw img2dataset with every request through the egress proxy, with the stage's policy."""
    s = settings(threads)
    with EgressProxy(egress_policy(s)) as proxy, egress_environment(proxy.url, s.max_pixels):
        return raw_img2dataset(urls, out, threads)


def stage(urls: list[str], out: Path, threads: int) -> float:
    matched = out / "matched.parquet"
    texts = [f"a picture {i}" for i in range(len(urls))]
    # The match stage's columns that download_part reads (query_ids only feeds the pre-download cap,
    # which is off here).
    pq.write_table(pa.table({"uid": [uid(u, t) for u, t in zip(urls, texts)], "url": urls, "text": texts,
                             "query_ids": pa.array([[i % 100] for i in range(len(urls))], pa.list_(pa.int32()))}),
                   matched)
    t = time.perf_counter()
    info = download_part(str(matched), settings(threads), str(out / "work"),
                         {"status": str(out / "status.parquet"), "images": str(out / "images.parquet"),
                          "log": str(out / "download.log")})
    seconds = time.perf_counter() - t
    assert info.get("success") == len(urls), info
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image", choices=["thumbnail", "photo"], default="thumbnail",
                        help="what every URL serves: the archive's 7.5 KB 300x116 JPEG (the stage's worst "
                             "case: its pHash is a large share of img2dataset's work), or a 640x480 photo")
    parser.add_argument("--smoke", action="store_true", help="--samples 40 --threads 8 --repeats 1")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.threads, args.repeats = 40, [8], 1
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        os.environ.pop(k, None)
    # The server runs in its own process, as a remote one would.
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    server = ctx.Process(target=serve, args=(ready, args.image), daemon=True)
    server.start()
    host, port, size = ready.get(timeout=60)
    try:
        urls = [f"http://{host}:{port}/ok/{i}.jpg" for i in range(args.samples)]
        print(f"{args.samples} images of {size} bytes from a local server, 2 cores, "
              f"img2dataset with 1 process; median of {args.repeats}")
        legs = {"raw img2dataset": raw_img2dataset, "through the proxy": proxied_img2dataset, "stage": stage}
        ratios = []
        for threads in args.threads:
            seconds: dict[str, list[float]] = {name: [] for name in legs}
            for i in range(args.repeats + 1):
                for name, leg in legs.items():
                    with tempfile.TemporaryDirectory() as tmp:
                        t = leg(urls, Path(tmp), threads)
                    if i:  # the first round warms up
                        seconds[name].append(t)
            rates = ", ".join(f"{name} {args.samples / statistics.median(t):.1f} samples/s "
                              f"({min(args.samples / x for x in t):.0f}-{max(args.samples / x for x in t):.0f})"
                              for name, t in seconds.items())
            raw = seconds["raw img2dataset"]
            proxied, ours = (overhead(seconds[name], raw) for name in ("through the proxy", "stage"))
            print(f"  {threads:>3} threads: {rates}; overhead (paired; of medians): proxy {proxied[0]:+.1%} "
                  f"({proxied[1]:+.1%}), stage {ours[0]:+.1%} ({ours[1]:+.1%})")
            ratios.append(f"{1 / (1 + ours[0]):.2f}x raw img2dataset's throughput at {threads} threads")
        print(f"ratio: {', '.join(ratios)} (goal: >= 0.91x, i.e. <= 10% overhead)")
    finally:
        server.terminate()


def overhead(leg: list[float], raw: list[float]) -> tuple[float, float]:
    """(median of each round's time over raw img2dataset's in that round, ratio of the medians), less one."""
    paired = statistics.median(t / r for t, r in zip(leg, raw))
    return paired - 1, statistics.median(leg) / statistics.median(raw) - 1


def serve(ready, image: str = "thumbnail") -> None:
    with MiniWeb([REPO / "data/warc/aut-example-2008.warc.gz"]) as web:
        if image == "photo":
            sys.path.insert(0, str(REPO / "bench"))
            from corpus import photos

            web.sample_image = photos((640, 480), 1)[0]
        ready.put((*web.address, len(web.sample_image)))
        web.stop.wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
