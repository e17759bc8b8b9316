"""WebDataset tar files: ustar members written by filling in one header template.

Headers come from the standard library's tarfile (mode 0444, mtime 0, root); the data goes out with
plain writes, to a temporary name that is renamed into place, so a shard killed mid-write never looks
complete. Member names are made safe first: no path separators, no '..', no leading dot.
"""

from __future__ import annotations

import re
import tarfile

from .workspace import atomic_path

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(key: str) -> str:
    """A member-name stem with no path separators, no '..' and no leading dot."""
    key = _UNSAFE.sub("_", key).lstrip("._-")
    return key or "sample"


def _template() -> bytes:
    info = tarfile.TarInfo("x")
    info.mode = 0o444
    return info.tobuf(format=tarfile.USTAR_FORMAT)


_TEMPLATE = _template()
_MODE_TO_SIZE, _MTIME, _AFTER_CHECKSUM = _TEMPLATE[100:124], _TEMPLATE[136:148], _TEMPLATE[156:]
# The checksum is the byte sum of the header with its checksum field as spaces: the fixed part once.
_FIXED_SUM = sum(_MODE_TO_SIZE) + sum(_MTIME) + sum(_AFTER_CHECKSUM) + 8 * ord(" ")


def tar_header(name: str, size: int) -> bytes:
    """tarfile's ustar header for a regular file of this name and size, built by filling in a
    template: the same bytes as TarInfo.tobuf, much faster (names are short ASCII here)."""
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"member name too long for ustar: {name!r}")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_FIXED_SUM + sum(raw) + sum(size_field))
    return b"".join((raw.ljust(100, b"\0"), _MODE_TO_SIZE, size_field, _MTIME, checksum, _AFTER_CHECKSUM))


def write_samples(f, samples, ext: str) -> None:
    """The tar stream of (key, image, caption, json) samples."""
    for key, image, text, meta in samples:
        caption = text.encode()
        f.writelines((
            tar_header(f"{key}.{ext}", len(image)), image, b"\0" * (-len(image) % 512),
            tar_header(f"{key}.txt", len(caption)), caption, b"\0" * (-len(caption) % 512),
            tar_header(f"{key}.json", len(meta)), meta, b"\0" * (-len(meta) % 512)))
    f.write(b"\0" * 1024)  # the end-of-archive marker


def write_shard(path: str, samples, ext: str) -> int:
    """Write a shard under a temporary name, fsync it and rename it into place; returns its size."""
    with atomic_path(path) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
        write_samples(f, samples, ext)
        return f.tell()
