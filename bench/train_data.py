"""Training data loading on one core: samples/s from 256-px JPEG shards to model-ready batches
(decode, random square crop to 224 px, tokenise), wit's loader against open_clip_train's per-sample
path (PIL decode, RandomResizedCrop + ToTensor + Normalize, one tokenizer call a sample), same shards,
same run. Then the same loader streaming the same shards from an S3 server on 127.0.0.1 (moto's, in a
process of its own; skipped without moto) against reading them from local disk.

    .venv/bin/python bench/train_data.py [--samples 4000] [--size 224] [--stored 256] [--smoke]

--smoke: 128 samples in batches of 32 (the test suite's check that it still runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# torch, open_clip and the trainer are imported where they are used, so that bench/train_throughput.py
# can borrow make_shards without paying for them.
from corpus import PHOTOS, photos

from wit_builder.tar import write_shard

CAPTIONS = ["{} on a wooden table, seen from above in soft morning light",
            "close-up photo of a {} at the museum", "{}", "a {} and its reflection, 35mm film",
            "vintage postcard: the {} in spring"]


def make_shards(folder: Path, samples: int, stored: int) -> list[str]:
    images = photos(stored, samples)
    rows = [(f"{i:08d}", images[i], CAPTIONS[i % len(CAPTIONS)].format(PHOTOS[i % len(PHOTOS)].split(".")[0]),
             b"{}") for i in range(samples)]
    urls = []
    for start in range(0, samples, 1000):
        urls.append(str(folder / f"{start // 1000:06d}.tar"))
        write_shard(urls[-1], rows[start:start + 1000], "jpg")
    return urls


def wit_loader(urls: list[str], tokenizer, size: int, batch: int):
    from trainer import data

    stream = data.ShardStream([data.Source(urls)], tokenizer, size, batch, resampled=False,
                              shuffle_buffer=1000)
    return iter(data.loader(stream, 0))


def open_clip_loader(urls: list[str], tokenizer, size: int, batch: int):
    """open_clip_train.data.get_wds_dataset's per-sample stages, in one process."""
    import open_clip
    import webdataset as wds

    preprocess = open_clip.image_transform(size, is_train=True)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.shuffle(1000),
        wds.decode("pilrgb"), wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"), wds.batched(batch))
    return iter(pipeline.repeat(nepochs=1000))


def rate(batches, samples: int, batch: int) -> float:
    next(batches)  # warm-up: first shard open, shuffle buffer fill
    start = time.perf_counter()
    for _ in range(samples // batch):
        next(batches)
    return (samples // batch) * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--size", type=int, default=224, help="training image size")
    p.add_argument("--stored", type=int, default=256, help="short side of the stored JPEGs")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--smoke", action="store_true", help="--samples 128 --batch 32")
    args = p.parse_args()
    if args.smoke:
        args.samples, args.batch = 128, 32
    import open_clip
    import torch

    torch.set_num_threads(1)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with tempfile.TemporaryDirectory() as tmp:
        urls = make_shards(Path(tmp), args.samples, args.stored)
        print(f"{args.samples} samples, {args.stored}-px JPEGs -> {args.size} px, batch {args.batch}, one core")
        ours = rate(wit_loader(urls, tokenizer, args.size, args.batch), args.samples, args.batch)
        theirs = rate(open_clip_loader(urls, tokenizer, args.size, args.batch), args.samples, args.batch)
        remote = from_store(urls, tokenizer, args.size, args.batch, args.samples)
    print(f"wit loader           {ours:8.0f} samples/s per core")
    print(f"open_clip per-sample {theirs:8.0f} samples/s per core")
    print(f"ratio: {ours / theirs:.2f}x open_clip's per-sample path   (goal: >= 1,500 samples/s per core)")
    if remote:
        local, s3 = remote
        print(f"wit loader, local disk {local:6.0f} samples/s; from S3 (local server) {s3:6.0f} samples/s")
        print(f"ratio: {s3 / local:.2f}x local disk's rate from S3   (goal: >= 0.8x)")


def from_store(urls: list[str], tokenizer, size: int, batch: int, samples: int) -> tuple[float, float] | None:
    """(local, S3) samples/s of wit's loader on the same shards, measured alternately, best of two."""
    import importlib.util

    if importlib.util.find_spec("moto") is None:
        print("moto is not installed: no S3 leg")
        return None
    import fsspec

    from wit_builder.storage import LocalS3

    with LocalS3() as s3:
        bucket = s3.bucket("bench")
        remote = []
        for u in urls:
            remote.append(f"{bucket}/{Path(u).name}")
            fsspec.filesystem("s3").put_file(u, remote[-1])
        local, there = [], []
        for _ in range(2):
            local.append(rate(wit_loader(urls, tokenizer, size, batch), samples, batch))
            there.append(rate(wit_loader(remote, tokenizer, size, batch), samples, batch))
    return max(local), max(there)


if __name__ == "__main__":
    main()
