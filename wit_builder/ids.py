"""Stable identifiers and hash-seeded randomness.

Every random choice in a run is a pure function of (key, seed), so the corpus is the same on one core
or a cluster, before or after a crash.
"""

import hashlib

_MASK53 = (1 << 53) - 1


def uid(url: str, text: str) -> str:
    """A stable 16-hex-digit id for an (image url, text) pair; never a row position."""
    h = hashlib.blake2b(digest_size=8)
    h.update(url.encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def seeded_uniform(*parts: object, seed: int = 0) -> float:
    """A uniform float in [0, 1) derived from the hash of `parts` and `seed`."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(seed).encode())
    for part in parts:
        h.update(b"\x1f")
        h.update(str(part).encode("utf-8", "surrogatepass"))
    return (int.from_bytes(h.digest(), "big") & _MASK53) / float(1 << 53)


def fingerprint(obj: object) -> str:
    """A short content hash of a JSON-able object: what a completion marker records."""
    import json

    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
