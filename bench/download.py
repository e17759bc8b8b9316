"""Download: raw img2dataset against the download stage (img2dataset behind the egress proxy, with
status rows, retries and image checks), same URL list, same local server, same run.

    .venv/bin/python bench/download.py [--samples N] [--threads 16 64] [--smoke]

--smoke: 40 URLs, 8 threads (the test suite's check that it still runs).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.download import download_part, output_to  # noqa: E402
from pipelines.miniweb import MiniWeb  # noqa: E402
from wit_builder.ids import uid  # noqa: E402
from wit_builder.recipe import DownloadSettings  # noqa: E402


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


def stage(urls: list[str], out: Path, threads: int) -> float:
    matched = out / "matched.parquet"
    texts = [f"a picture {i}" for i in range(len(urls))]
    # The match stage's columns that download_part reads (query_ids only feeds the pre-download cap,
    # which is off here).
    pq.write_table(pa.table({"uid": [uid(u, t) for u, t in zip(urls, texts)], "url": urls, "text": texts,
                             "query_ids": pa.array([[i % 100] for i in range(len(urls))], pa.list_(pa.int32()))}),
                   matched)
    settings = DownloadSettings(thread_count=threads, allow_loopback=True, timeout=10).model_dump(mode="json")
    t = time.perf_counter()
    info = download_part(str(matched), settings, str(out / "work"),
                         {"status": str(out / "status.parquet"), "images": str(out / "images.parquet"),
                          "log": str(out / "download.log")})
    seconds = time.perf_counter() - t
    assert info.get("success") == len(urls), info
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--smoke", action="store_true", help="--samples 40 --threads 8")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.threads = 40, [8]
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        os.environ.pop(k, None)
    # The server runs in its own process, as a remote one would.
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    server = ctx.Process(target=serve, args=(ready,), daemon=True)
    server.start()
    host, port, size = ready.get(timeout=60)
    try:
        urls = [f"http://{host}:{port}/ok/{i}.jpg" for i in range(args.samples)]
        print(f"{args.samples} images of {size} bytes from a local server, 2 cores, "
              f"img2dataset with 1 process")
        ratios = []
        for threads in args.threads:
            with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
                raw = raw_img2dataset(urls, Path(a), threads)
                ours = stage(urls, Path(b), threads)
            print(f"  {threads:>3} threads: raw img2dataset {args.samples / raw:7.1f} samples/s, "
                  f"stage {args.samples / ours:7.1f} samples/s; stage overhead {ours / raw - 1:+.1%}")
            ratios.append(f"{raw / ours:.2f}x raw img2dataset's throughput at {threads} threads")
        print(f"ratio: {', '.join(ratios)} (goal: >= 0.91x, i.e. <= 10% overhead)")
    finally:
        server.terminate()


def serve(ready) -> None:
    with MiniWeb([REPO / "data/warc/aut-example-2008.warc.gz"]) as web:
        ready.put((*web.address, len(web.sample_image)))
        web.stop.wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
