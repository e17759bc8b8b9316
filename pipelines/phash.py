"""64-bit perceptual hashes (imagehash's pHash), from image bytes, in batches.

imagehash decodes the whole image, converts it to grey, resizes to 32x32 and takes a DCT. A JPEG can be
decoded straight to a small grey image in "draft" mode (the decoder skips the fine DCT coefficients),
which is several times faster; everything after the decode is imagehash's exact computation, done for
many images at once. The bits equal `imagehash.phash` of the same draft-decoded
image; against a full decode they differ by about half a bit on average (bench/README.md), which the
dedup radius absorbs.

Images with transparency are flattened onto white first, exactly as img2dataset stores them (its
resizer alpha-mattes every 4-channel OpenCV decode onto white), so an evaluation image and its
downloaded, stored copy hash alike.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

SIDE = 32  # imagehash: hash_size 8 x highfreq_factor 4
DRAFT = 64  # decode JPEGs to at least this size: enough for a 32-pixel Lanczos resize


def has_alpha(im: Image.Image) -> bool:
    """Whether OpenCV's IMREAD_UNCHANGED (img2dataset's decode) gives this image an alpha channel:
    RGBA, LA and PA; palette and RGB images with a transparency entry (PNG tRNS, GIF). A grey image
    with a tRNS entry decodes without one, so img2dataset stores it unflattened."""
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return True
    return im.mode in ("P", "RGB") and "transparency" in im.info


def flatten_on_white(im: Image.Image) -> Image.Image:
    """The image alpha-matted onto white, as img2dataset's resizer does it (float, then rint)."""
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:]
    rgb = alpha / 255 * rgba[..., :3] + 255 - alpha
    return Image.fromarray(np.rint(rgb.clip(0, 255)).astype(np.uint8), "RGB")


def small_grey(data: bytes, draft: bool = True) -> np.ndarray:
    """The 32x32 grey pixels imagehash would hash (of the draft decode, for JPEGs), after flattening
    any transparency onto white."""
    with Image.open(io.BytesIO(data)) as im:
        if draft and im.format == "JPEG":
            im.draft("L", (DRAFT, DRAFT))
        if has_alpha(im):
            im = flatten_on_white(im)
        return np.asarray(im.convert("L").resize((SIDE, SIDE), Image.Resampling.LANCZOS))


def phash_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint64 pHashes of a batch of 32x32 grey images (n, 32, 32)."""
    import scipy.fftpack

    # The same transform as imagehash, batched: identical floating point, so identical bits even for
    # flat images whose coefficients sit at the median.
    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels.astype(np.float64), axis=1), axis=2)
    low = dct[:, :8, :8].reshape(len(pixels), 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def phash_bytes(images: list[bytes], draft: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, ok): pHash of each encoded image; ok is False where the image does not decode."""
    pixels = np.zeros((len(images), SIDE, SIDE), np.uint8)
    ok = np.ones(len(images), bool)
    for i, data in enumerate(images):
        try:
            pixels[i] = small_grey(data, draft)
        except Exception:
            ok[i] = False
    return phash_pixels(pixels), ok


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distances between uint64 arrays."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int32)
