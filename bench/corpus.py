"""The corpus stages' hot paths, each against a reference measured in the same run, on one core:

- pHash from JPEG bytes: wit (draft decode + batched DCT) against imagehash on a full decode, at 256 px
  and 640x480, on real photos (scikit-image's sample images); bit equality and the mean Hamming
  distance to the full-decode hash;
- near-duplicate search: 10M hashes with planted near duplicates, recall checked against brute force
  on a subsample;
- shard writing: wit's tar writer against a raw f.write of the same bytes, tarfile and webdataset;
- balancing: 100M synthetic (uid, query_ids) rows.

These are the kernels the stages call today: `pipelines.phash.phash_bytes` (download), the
`pipelines.neardup.near_duplicate_pairs` search that each dedup bucket runs, `wit_builder.tar.write_shard`
(shards) and `pipelines.sampling.keep_mask`, the balancing rule that the balance stage and the
pre-download cap apply. Dedup, balance and shards are now shuffles over partitions (README, "At web
scale"); the near-duplicate search here runs over all hashes in one call, as one bucket would, and the
stages end to end at scale are bench/scale.py's to measure.

    .venv/bin/python bench/corpus.py [--hashes 10000000] [--rows 100000000] [--smoke]

--smoke: 24 images, 200 shard samples, 20,000 hashes, 100,000 rows, one timed run each (the test
suite's check that it still runs). Without imagehash or scikit-image (the `bench` extra), pHash and
shard writing run on generated pictures and pHash has no reference.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.dedup.neardup import brute_force_pairs, near_duplicate_pairs
from pipelines.phash import phash_bytes
from pipelines.sampling import keep_mask
from wit_builder.tar import write_samples, write_shard

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
          "hubble_deep_field.jpg", "camera.png", "moon.png", "horse.png", "brick.png", "grass.png"]


@functools.cache
def _pictures() -> tuple:
    """scikit-image's sample photos, or (without scikit-image) smooth generated pictures."""
    from PIL import Image

    try:
        import skimage.data
    except ImportError:
        rng = np.random.default_rng(0)
        return tuple(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
                     .resize((640, 480), Image.Resampling.BICUBIC) for _ in PHOTOS)
    folder = Path(skimage.data.__file__).parent
    return tuple(Image.open(folder / name).convert("RGB") for name in PHOTOS)


def photos(size: tuple[int, int] | int, copies: int) -> list[bytes]:
    from PIL import Image

    out = []
    for im in _pictures():
        if isinstance(size, int):  # shorter side to `size`, as the download stage stores them
            scale = size / min(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
        else:
            im = im.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return (out * (copies // len(out) + 1))[:copies]


def bench_phash(n: int) -> list[str]:
    from PIL import Image

    try:
        import imagehash
    except ImportError:
        imagehash = None
    print("pHash from JPEG bytes, one core")
    ratios = []
    for label, size in (("256 px", 256), ("640x480", (640, 480))):
        images = photos(size, n)
        if imagehash is None:
            phash_bytes(images[:1])  # warm-up: lazy imports
            t = time.perf_counter()
            phash_bytes(images)
            print(f"  {label:8} wit {n / (time.perf_counter() - t):7.0f}/s; imagehash not installed")
            continue
        imagehash.phash(Image.open(io.BytesIO(images[0])))  # warm-up: lazy imports
        phash_bytes(images[:1])
        t = time.perf_counter()
        ref = [int(str(imagehash.phash(Image.open(io.BytesIO(b)))), 16) for b in images]
        t_ref = time.perf_counter() - t
        t = time.perf_counter()
        ours, _ = phash_bytes(images)
        t_ours = time.perf_counter() - t
        same_decode = [int(str(imagehash.phash(_draft(b))), 16) for b in images[: len(PHOTOS)]]
        equal = all(int(h) == r for h, r in zip(ours[: len(PHOTOS)], same_decode))
        dist = np.mean([bin(int(h) ^ r).count("1") for h, r in zip(ours[: len(PHOTOS)], ref)])
        print(f"  {label:8} imagehash (full decode) {n / t_ref:7.0f}/s, wit {n / t_ours:7.0f}/s: "
              f"{t_ref / t_ours:.1f}x; bits equal imagehash on the same decode: {equal}; "
              f"mean distance to full decode {dist:.2f} bits")
        ratios.append(f"pHash {label} {t_ref / t_ours:.1f}x imagehash")
    return ratios


def _draft(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.draft("L", (64, 64))
    return im


def bench_neardup(n: int, k: int = 4, brute: int = 20_000) -> None:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    planted = n // 100
    src, dst = rng.choice(n, (2, planted), replace=False)
    # Each planted copy is its source with 0..k distinct random bits flipped.
    masks = np.zeros(planted, np.uint64)
    for row, f in enumerate(rng.integers(0, k + 1, planted)):
        for bit in rng.choice(64, f, replace=False):
            masks[row] |= np.uint64(1) << np.uint64(bit)
    hashes[dst] = hashes[src] ^ masks
    t = time.perf_counter()
    i, j, d = near_duplicate_pairs(hashes, k)
    seconds = time.perf_counter() - t
    found = set(zip(i.tolist(), j.tolist()))
    want = {(min(a, b), max(a, b)) for a, b in zip(src.tolist(), dst.tolist())
            if bin(int(hashes[a] ^ hashes[b])).count("1") <= k}
    sub = np.sort(rng.choice(n, min(brute, n), replace=False))
    members = set(sub.tolist())
    reference = brute_force_pairs(hashes[sub], k)
    ours_sub = {(int(np.searchsorted(sub, x)), int(np.searchsorted(sub, y))) for x, y in found
                if x in members and y in members}
    print(f"near duplicates, k={k}: {n:,} hashes in {seconds:.1f} s on one core; "
          f"planted pairs found {len(want & found):,}/{len(want):,}; "
          f"brute force on a {len(sub):,} subsample agrees: {ours_sub == reference}")


def bench_shards(samples: int = 20_000, repeats: int = 3) -> list[str]:
    import webdataset as wds  # before timing: it imports torch

    images = photos(256, samples)
    rows = [(f"{i:016x}", img, "a caption of about forty characters long",
             b'{"uid": "0000000000000000", "url": "http://example.com/a.jpg", "width": 256}')
            for i, img in enumerate(images)]
    total = sum(len(r[1]) + len(r[2]) + len(r[3]) for r in rows) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        def timed(fn) -> float:
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            return best

        def raw(durable: bool = False):
            with open(Path(tmp) / "raw.bin", "wb", buffering=1 << 20) as f:
                for _, img, txt, meta in rows:
                    f.write(img)
                    f.write(txt.encode())
                    f.write(meta)
                if durable:  # what write_shard adds for crash safety
                    f.flush()
                    os.fsync(f.fileno())

        def tar_layer():
            with open(Path(tmp) / "layer.tar", "wb", buffering=1 << 20) as f:
                write_samples(f, rows, "jpg")

        def with_tarfile():
            with tarfile.open(Path(tmp) / "tf.tar", "w") as tf:
                for key, img, txt, meta in rows:
                    for ext, data in (("jpg", img), ("txt", txt.encode()), ("json", meta)):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))

        def with_webdataset():
            with wds.TarWriter(str(Path(tmp) / "wds.tar")) as w:
                for key, img, txt, meta in rows:
                    w.write({"__key__": key, "jpg": img, "txt": txt, "json": meta})

        t_raw = timed(raw)
        t_layer = timed(tar_layer)
        t_raw_durable = timed(lambda: raw(durable=True))
        t_ours = timed(lambda: write_shard(str(Path(tmp) / "wit.tar"), rows, "jpg"))
        t_tf = timed(with_tarfile)
        t_wds = timed(with_webdataset)
    print(f"shard writing, {samples:,} samples, {total:.0f} MB, best of {repeats}:")
    print(f"  to the page cache: raw f.write {total / t_raw:.0f} MB/s, wit's tar stream "
          f"{total / t_layer:.0f} MB/s ({t_raw / t_layer:.0%} of raw), tarfile {total / t_tf:.0f} MB/s, "
          f"webdataset TarWriter {total / t_wds:.0f} MB/s")
    print(f"  durably (fsync): raw f.write {total / t_raw_durable:.0f} MB/s, wit's write_shard "
          f"{total / t_ours:.0f} MB/s ({t_raw_durable / t_ours:.0%} of raw)")
    return [f"tar stream {t_raw / t_layer:.2f}x raw f.write", f"write_shard {t_raw_durable / t_ours:.2f}x raw "
            f"f.write + fsync", f"{t_tf / t_layer:.1f}x tarfile"]


def bench_balance(rows: int, chunk: int = 10_000_000) -> None:
    rng = np.random.default_rng(0)
    counts = None
    qid_space = 500_000
    t_all = 0.0
    kept = 0
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        lengths = rng.integers(1, 4, n)
        offsets = np.r_[0, np.cumsum(lengths)]
        qids = np.minimum(rng.zipf(1.2, offsets[-1]) - 1, qid_space - 1)
        uid64 = rng.integers(0, 2**63, n, dtype=np.uint64)
        if counts is None:  # counts of the whole synthetic corpus, scaled from the first chunk
            counts = np.bincount(qids, minlength=qid_space) * (rows // n)
        t = time.perf_counter()
        kept += int(keep_mask(uid64, offsets, qids, counts, 20_000, seed=0).sum())
        t_all += time.perf_counter() - t
    print(f"balancing {rows:,} rows (1-3 queries each, t = 20,000): {t_all:.1f} s on one core, "
          f"{rows / t_all / 1e6:.1f} M rows/s; kept {kept:,}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--hashes", type=int, default=10_000_000)
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--samples", type=int, default=20_000, help="samples written to a shard")
    parser.add_argument("--smoke", action="store_true",
                        help="--images 24 --samples 200 --hashes 20000 --rows 100000, one timed run each")
    args = parser.parse_args()
    repeats = 3
    if args.smoke:
        args.images, args.samples, args.hashes, args.rows, repeats = 24, 200, 20_000, 100_000, 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ratios = bench_phash(args.images)
    ratios += bench_shards(args.samples, repeats)
    bench_neardup(args.hashes, brute=2_000 if args.smoke else 20_000)
    bench_balance(args.rows, chunk=min(args.rows, 10_000_000))
    print(f"ratio: {', '.join(ratios)}")


if __name__ == "__main__":
    main()
