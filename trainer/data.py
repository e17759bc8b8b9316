"""Stream WebDataset shards into batches of uint8 images and token ids.

Sources are local paths, brace patterns, globs, directories of .tar files, `pipe:` commands, http(s)
URLs (curl, as webdataset opens them), file:// and any other fsspec URL (s3://, gs://, ...). Several
sources can be mixed with weights.

Training streams never end: shards are drawn with replacement (`resampled`, the default), or each
worker loops over its share of the shards, reshuffled every pass. Either way no rank runs dry before
another, so distributed training cannot hang on an uneven last batch. Shards are split over
rank x worker slots; with fewer shards than slots every slot reads every shard and keeps every n-th
sample instead, so no worker starves.

A broken sample (undecodable image, missing caption, bad UTF-8, too many pixels, a truncated tar) is
skipped and counted; each batch carries the count its worker skipped since its previous batch.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import cv2
import fsspec
import numpy as np
import simplejpeg
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from wit_builder import storage
from wit_builder.errors import WitError

log = logging.getLogger("wit.train")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
MAX_PIXELS = 50_000_000  # larger images are skipped before they are decoded
MAX_BROKEN_IN_A_ROW = 10_000  # then the data, not a sample, is broken: stop instead of spinning
WEBDATASET_SCHEMES = {"", "pipe", "http", "https", "file"}
cv2.setNumThreads(1)  # one loader worker, one core


class BrokenSample(Exception):
    pass


@dataclass
class Source:
    urls: list[str]
    weight: float = 1.0


def expand(spec: str) -> list[str]:
    """A brace pattern, glob, directory of .tar files or URL, as a sorted list of shard URLs. In an
    object store (s3://...) a glob or a prefix is listed, and the first shard is looked up, so that a
    wrong bucket, missing credentials or an unreachable endpoint fail here, naming the URL."""
    if storage.is_object_url(spec):
        urls = []
        for pattern in braceexpand.braceexpand(spec):
            one = pattern.endswith(".tar") and not any(c in pattern for c in "*?[")
            urls += [pattern] if one else storage.list_objects(pattern, ".tar")
        storage.identity(urls[0])
        return urls
    if re.match(r"^[a-z][a-z0-9+.-]*:", spec) and not Path(spec).exists():
        return list(braceexpand.braceexpand(spec))
    urls = []
    for pattern in braceexpand.braceexpand(spec):
        path = Path(pattern)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
        elif any(c in pattern for c in "*?["):
            found = sorted(glob.glob(pattern))
        elif path.is_file():
            found = [pattern]
        else:
            raise WitError("no such shard", where=pattern)
        if not found:
            raise WitError("no .tar shards here", where=pattern)
        urls += found
    return urls


def sources(specs: list[str], weights: list[float] | None = None) -> list[Source]:
    """Parse --data arguments; each may also hold several patterns joined by '::' (open_clip's way)."""
    specs = [part for spec in specs for part in spec.split("::")]
    weights = weights or [1.0] * len(specs)
    if len(weights) != len(specs):
        raise WitError(f"{len(weights)} weights for {len(specs)} data sources")
    if any(w <= 0 for w in weights):
        raise WitError(f"data weights must be positive, got {weights}")
    return [Source(expand(s), w) for s, w in zip(specs, weights)]


def open_shard(url: str):
    scheme = url.split(":", 1)[0] if re.match(r"^[a-z][a-z0-9+.-]*:", url) else ""
    if scheme in WEBDATASET_SCHEMES:
        return wds.gopen(url.removeprefix("file://"))
    return fsspec.open(url, "rb").open()


def slot() -> tuple[int, int]:
    """This loader worker's place among all rank x worker slots."""
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    return rank * workers + worker, world * workers


def square_crop(width: int, height: int, rng: random.Random | None, scale: tuple[float, float]):
    """CLIP's augmentation: a random square covering `scale` of the short side's square, or the
    centre square when rng is None (evaluation)."""
    short = min(width, height)
    if rng is None:
        side = short
        return (width - side) / 2, (height - side) / 2, side
    side = short * math.sqrt(rng.uniform(*scale))
    return rng.uniform(0, width - side), rng.uniform(0, height - side), side


def load_image(data: bytes, size: int, rng: random.Random | None,
               scale: tuple[float, float] = (0.9, 1.0)) -> np.ndarray:
    """Decode, crop and resize to size x size RGB uint8, cheaply: a JPEG decodes (libjpeg-turbo,
    through simplejpeg) at the smallest DCT scale that still covers the crop, the crop is a view of
    the decoded array, and only the crop is resized (OpenCV)."""
    try:
        if data[:3] == b"\xff\xd8\xff":
            pixels, (x, y, side) = _decode_jpeg(data, size, rng, scale)
        else:
            pixels, (x, y, side) = _decode_other(data, rng, scale)
    except BrokenSample:
        raise
    except Exception as e:  # decoders raise many types for hostile input
        raise BrokenSample(f"image: {type(e).__name__}: {e}") from e
    x, y, side = round(x), round(y), max(1, round(side))
    # Linear is exact enough near 1:1 (JPEGs are decoded to within 2x); area averages larger steps.
    method = cv2.INTER_LINEAR if side < 2 * size else cv2.INTER_AREA
    return cv2.resize(pixels[y:y + side, x:x + side], (size, size), interpolation=method)


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise BrokenSample(f"{width}x{height} image, over {MAX_PIXELS:,} pixels")


def _decode_jpeg(data: bytes, size: int, rng, scale):
    """(RGB array, crop box in its pixels), decoded at the smallest scale covering the crop."""
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    _check_pixels(width, height)
    x, y, side = square_crop(width, height, rng, scale)
    factor = size / side
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True,
                                        min_width=math.ceil(width * factor),
                                        min_height=math.ceil(height * factor))
    except ValueError:  # CMYK and other rare JPEGs
        return _decode_other(data, None, scale, (x, y, side))
    ratio = pixels.shape[1] / width
    return pixels, (x * ratio, y * ratio, side * ratio)


def _decode_other(data: bytes, rng, scale, crop=None):
    image = Image.open(io.BytesIO(data))
    _check_pixels(*image.size)
    crop = crop or square_crop(*image.size, rng, scale)
    if image.mode != "RGB":
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        image = image.convert("RGB")
    return np.asarray(image), crop


def image_bytes(sample: dict) -> bytes:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    raise BrokenSample(f"no image (keys: {sorted(k for k in sample if not k.startswith('__'))})")


def caption(sample: dict) -> str:
    if "txt" not in sample:
        raise BrokenSample("no .txt caption")
    try:
        return sample["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise BrokenSample(f"caption is not UTF-8: {e}") from e


def label(sample: dict, key: str) -> int:
    try:
        if key in sample:
            return int(sample[key].decode().strip())
        if "json" in sample:
            return int(json.loads(sample["json"])[key])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise BrokenSample(f"bad class field {key!r}: {e}") from e
    raise BrokenSample(f"no class field {key!r}")


class ShardStream(torch.utils.data.IterableDataset):
    """Batches from WebDataset shards; one instance serves every DataLoader worker.

    Training: endless, shuffled, randomly cropped, tokenised captions. Evaluation (`labels` set):
    one pass, centre crops, integer labels from the `labels` field.
    """

    def __init__(self, sources: list[Source], tokenizer, image_size: int, batch_size: int,
                 seed: int = 0, resampled: bool = True, shuffle_buffer: int = 2000,
                 scale: tuple[float, float] = (0.9, 1.0), labels: str | None = None):
        super().__init__()
        self.sources, self.tokenizer, self.size = sources, tokenizer, image_size
        self.batch_size, self.seed, self.resampled = batch_size, seed, resampled
        self.shuffle_buffer, self.scale, self.labels = shuffle_buffer, scale, labels
        self.skipped = 0
        self.shard_count = sum(len(s.urls) for s in sources)

    @property
    def train(self) -> bool:
        return self.labels is None

    def skip(self, where: str, error: Exception) -> bool:
        """webdataset's error handler, and ours: count, warn for the first few, carry on."""
        self.skipped += 1
        if self.skipped <= 5:
            log.warning("skipped a broken sample: %s: %s", where, error)
        return True

    def shard_urls(self, rng: random.Random, my_slot: int, slots: int):
        if self.train and self.resampled:
            weights = [s.weight for s in self.sources]
            while True:
                source = rng.choices(self.sources, weights)[0]
                yield rng.choice(source.urls)
        urls = [u for s in self.sources for u in s.urls]
        mine = urls[my_slot::slots] if len(urls) >= slots else urls
        while True:
            if self.train:
                rng.shuffle(mine)
            yield from mine
            if not self.train:
                return

    def members(self, urls):
        """Tar members of each shard, then an end-of-shard marker. A broken shard counts once:
        its good members are kept and reading stops at the break."""
        barren = 0  # shards in a row without a single member: an endless stream must not spin
        for url in urls:
            stream = None
            barren += 1
            if barren > max(100, 3 * self.shard_count):
                raise WitError(f"{barren - 1} shards in a row had no readable member", where=url)
            try:
                stream = open_shard(url)
                for member in tar_file_iterator(stream, handler=lambda e, url=url: not self.skip(url, e)):
                    member["__url__"] = url
                    barren = 0
                    yield member
            except Exception as e:  # not a tar at all, unreadable, or cut inside a header
                self.skip(url, e)
            finally:
                if stream is not None:
                    stream.close()
            yield {}

    def samples(self):
        my_slot, slots = slot()
        rng = random.Random(wds.utils.make_seed(self.seed, my_slot))
        every_shard = self.shard_count < slots and not (self.train and self.resampled)
        stream = group_by_keys(self.members(self.shard_urls(rng, my_slot, slots)),
                               handler=lambda e: self.skip("shard", e))
        if every_shard:
            stream = (s for i, s in enumerate(stream) if i % slots == my_slot)
        if self.train and self.shuffle_buffer > 1:
            stream = wds.filters._shuffle(stream, self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)
        broken = 0
        for sample in stream:
            try:
                image = load_image(image_bytes(sample), self.size, rng if self.train else None, self.scale)
                target = caption(sample) if self.train else label(sample, self.labels)
            except BrokenSample as e:
                where = f"{sample.get('__url__')} (sample {sample.get('__key__')})"
                self.skip(where, e)
                broken += 1
                if broken >= MAX_BROKEN_IN_A_ROW:
                    raise WitError(f"{broken} samples in a row were broken; the last: {e}", where=where) from e
                continue
            broken = 0
            yield image, target

    def __iter__(self):
        self.skipped = 0
        reported = 0
        images, targets = [], []
        for image, target in self.samples():
            images.append(image)
            targets.append(target)
            if len(images) == self.batch_size:
                yield self.batch(images, targets, self.skipped - reported)
                reported = self.skipped
                images, targets = [], []
        if images and not self.train:
            yield self.batch(images, targets, self.skipped - reported)

    def batch(self, images: list[np.ndarray], targets: list, skipped: int) -> dict:
        out = {"images": torch.from_numpy(np.stack(images)), "skipped": skipped}
        if self.train:
            out["texts"] = self.tokenizer(targets)
        else:
            out["labels"] = torch.tensor(targets)
        return out


def loader(stream: ShardStream, workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if workers else None)
