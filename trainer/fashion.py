"""Fashion-MNIST (Debian's dataset-fashion-mnist) as WebDataset shards: the trainer's sanity set.

The train split becomes image-caption shards whose captions vary templates, synonyms of the class
names and attributes read off the pixels (tone, fill); the test split becomes shards with a `cls`
field in their .json and a classnames.txt beside them, ready for `wit eval`. A sizes.json beside
them gives each shard's sample count (open_clip's convention, so open_clip's own trainer needs no
--train-num-samples).

    python -m trainer.fashion OUT [--source DIR] [--per-shard N]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from wit_builder.errors import WitError
from wit_builder.tar import write_shard
from wit_builder.workspace import atomic_write_bytes

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSNAMES = ["t-shirt", "trousers", "pullover", "dress", "coat",
              "sandal", "shirt", "sneaker", "bag", "ankle boot"]
SYNONYMS = [
    ["t-shirt", "tee", "top", "short-sleeved top"],
    ["trousers", "pants", "pair of trousers", "slacks"],
    ["pullover", "sweater", "jumper", "knitted pullover"],
    ["dress", "frock", "summer dress"],
    ["coat", "jacket", "winter coat"],
    ["sandal", "sandals", "open shoe", "summer sandal"],
    ["shirt", "button-up shirt", "collared shirt", "blouse"],
    ["sneaker", "trainer", "running shoe", "sports shoe"],
    ["bag", "handbag", "purse", "tote bag"],
    ["ankle boot", "boot", "short boot", "bootie"],
]
TEMPLATES = [
    "a photo of a {}.", "a {}.", "a picture of a {}.", "a {} on a black background.",
    "a product photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
    "a close-up of a {}.", "an image showing a {}.", "catalogue item: {}.", "my new {}.",
    "a grayscale image of the {}.", "a small photo of the {}.", "the {} for sale.",
]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): magic, dimensions, then raw bytes."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise WitError(f"cannot read: {e}", where=str(path)) from e
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if raw[:3] != b"\0\0\x08" or data.size != np.prod(shape):
        raise WitError(f"not an IDX file of bytes (header {raw[:4].hex()}, shape {shape})",
                       where=str(path))
    return data.reshape(shape)


def load(split: str, source: Path = SOURCE) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise WitError(f"{len(images)} images but {len(labels)} labels", where=str(source))
    return images, labels


def describe(image: np.ndarray, label: int, rng: random.Random) -> str:
    """A caption from a random template, a synonym of the class, and what the pixels show."""
    name = rng.choice(SYNONYMS[label])
    ink = image[image > 30]
    tone = "dark" if ink.size and ink.mean() < 110 else "light" if ink.size and ink.mean() > 170 else ""
    fill = (image > 30).mean()
    shape = "large" if fill > 0.55 else "slim" if fill < 0.25 else ""
    attributes = [a for a in (tone, shape) if a and rng.random() < 0.5]
    return rng.choice(TEMPLATES).format(" ".join(attributes + [name]))


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_split(out: Path, split: str, source: Path, per_shard: int, seed: int = 0,
                limit: int | None = None, sizes: dict | None = None) -> list[Path]:
    """Shards of (png, caption, {"cls": label}) in the corpus's own layout; test captions simply
    name the class. Each shard's sample count goes into sizes, by file name."""
    images, labels = load(split, source)
    order = np.random.default_rng(seed).permutation(len(images))[:limit]
    rng = random.Random(seed)
    paths = []
    for start in range(0, len(order), per_shard):
        samples = []
        for i in order[start:start + per_shard]:
            label = int(labels[i])
            text = describe(images[i], label, rng) if split == "train" else f"a {CLASSNAMES[label]}."
            samples.append((f"{split}{i:05d}", png(images[i]), text, b'{"cls": %d}' % label))
        paths.append(out / f"{split}-{start // per_shard:06d}.tar")
        write_shard(str(paths[-1]), samples, "png")
        if sizes is not None:
            sizes[paths[-1].name] = len(samples)
    return paths


def build(out: str | Path, source: Path = SOURCE, per_shard: int = 5000,
          limit: int | None = None) -> tuple[list[Path], list[Path]]:
    """Write train-*.tar and test-*.tar shards, sizes.json (samples per shard, open_clip's
    convention), then classnames.txt (last: it marks the set complete); return the two shard lists."""
    out = Path(out)
    sizes: dict[str, int] = {}
    shards = (write_split(out, "train", source, per_shard, limit=limit, sizes=sizes),
              write_split(out, "test", source, per_shard, limit=limit, sizes=sizes))
    atomic_write_bytes(out / "sizes.json", json.dumps(sizes, indent=1).encode())
    atomic_write_bytes(out / "classnames.txt", ("\n".join(CLASSNAMES) + "\n").encode())
    return shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.fashion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--per-shard", type=int, default=5000)
    args = parser.parse_args(argv)
    try:
        train, test = build(args.out, args.source, args.per_shard)
    except WitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(train)} train and {len(test)} test shards in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
