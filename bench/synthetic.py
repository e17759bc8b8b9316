"""A synthetic download-stage output of N pairs, for running dedup -> balance -> shards at scale.

What it writes is what the download stage writes, partition by partition, with the manifests the next
stages plan from: `candidates/`, `matched/` and `download/` parts (status rows with sha256, pHash,
sizes; image bytes) and a 500k-entry query list. Images are real small JPEGs, encoded here from a pool
of smooth random pictures, so their sizes and the bytes that shards copy are real. Planted at known
rates, over the whole corpus and across partitions:

- exact copies (same bytes, another URL and text),
- near copies (a re-encode: other bytes, a pHash 1-4 bits away),
- same-URL pairs (the URL of an earlier pair with another text).

The pHash column of a distinct image is a random 64-bit value (the download stage computes real ones;
bench/corpus.py measures that), so unplanted images are ~32 bits apart, as real distinct images are.
Query ids are Zipf-distributed over 500k queries, 1-3 per pair.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import tomli_w
from PIL import Image

from wit_builder.ids import fingerprint
from wit_builder.shuffle import u64_to_uid
from wit_builder.workspace import parquet_writer, write_parquet

QUERIES = 500_000
POOL = 4096  # distinct encoded pictures by default; exact copies share bytes, others differ in sha256 anyway


def jpeg_pool(rng: np.random.Generator, n: int = POOL) -> list[bytes]:
    """Small smooth pictures (16-48 px, a few hundred bytes to a few KB as JPEG)."""
    out = []
    for _ in range(n):
        side = int(rng.integers(16, 49))
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        im = Image.fromarray(low).resize((side, side), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (side, side, 3))
        im = Image.fromarray(np.clip(np.asarray(im).astype(int) + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(60, 90)))
        out.append(buf.getvalue())
    return out


def write_queries(run_dir: Path) -> dict:
    path = run_dir / "queries" / "queries.parquet"
    n = QUERIES
    table = pa.table({"query_id": pa.array(np.arange(n), pa.int32()), "query": [f"q{i}" for i in range(n)],
                      "sources": pa.array([["unigram"]] * n, pa.list_(pa.string())),
                      "count": pa.array(np.full(n, 100), pa.int64()), "pmi": pa.array([None] * n, pa.float64()),
                      "views": pa.array([None] * n, pa.int64()), "inlinks": pa.array([None] * n, pa.int64())})
    write_parquet(table, path)
    (run_dir / "queries" / "queries.txt").write_text("".join(f"q{i}\n" for i in range(n)))
    return {"queries": str(path), "queries_txt": str(run_dir / "queries" / "queries.txt")}


def write_manifest(run_dir: Path, stage: str, partitions: list[dict], outputs: dict) -> str:
    fp = fingerprint([p["fingerprint"] for p in partitions] + [outputs])
    body = {"stage": stage, "fingerprint": fp, "outputs": outputs, "partitions": partitions, "plan": ""}
    path = run_dir / "_state" / stage / "_manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1, sort_keys=True))
    return fp


def build(root: str | Path, name: str, n: int, partitions: int, seed: int = 0, exact_rate: float = 0.05,
          near_rate: float = 0.05, url_rate: float = 0.02, recipe: dict | None = None, pool: int = POOL) -> Path:
    """Write the run folder root/name with n pairs in `partitions` partitions; returns the recipe.
    A bigger `pool` of pictures makes the stored images as incompressible as real JPEGs are (a small
    one repeats within parquet's compression window)."""
    root = Path(root).resolve()
    run_dir = root / name
    rng = np.random.default_rng(seed)
    pool = jpeg_pool(rng, pool)
    pool_sha = [hashlib.sha256(b).hexdigest() for b in pool]
    queries = write_queries(run_dir)
    write_manifest(run_dir, "queries", [], queries)

    # Every pair's identity, then the planted copies pointing at earlier pairs.
    uid = rng.integers(0, 2**63, n, dtype=np.uint64) | (rng.integers(0, 2, n, dtype=np.uint64) << np.uint64(63))
    phash = rng.integers(0, 2**63, n, dtype=np.uint64) ^ (rng.integers(0, 2, n, dtype=np.uint64) << np.uint64(63))
    picture = rng.integers(0, len(pool), n)
    sha_id = np.arange(n)  # pairs with the same sha_id share bytes and sha256
    url_id = np.arange(n)
    kind = rng.random(n)
    source = (rng.random(n) * np.arange(n)).astype(np.int64)  # an earlier pair, anywhere in the corpus
    exact = (kind < exact_rate) & (np.arange(n) > 0)
    near = (kind >= exact_rate) & (kind < exact_rate + near_rate) & (np.arange(n) > 0)
    same_url = (kind >= exact_rate + near_rate) & (kind < exact_rate + near_rate + url_rate) & (np.arange(n) > 0)
    for i in np.flatnonzero(exact | near | same_url):  # in order, so chains resolve to the original
        s = source[i]
        if exact[i]:
            sha_id[i], picture[i], phash[i] = sha_id[s], picture[s], phash[s]
        elif near[i]:
            flips = rng.choice(64, int(rng.integers(1, 5)), replace=False)
            phash[i] = phash[s] ^ np.uint64(sum(1 << int(f) for f in flips))
            picture[i] = picture[s]
        else:
            url_id[i] = url_id[s]
    lengths = rng.integers(1, 4, n)
    qids = np.minimum(rng.zipf(1.25, lengths.sum()) - 1, QUERIES - 1).astype(np.int32)
    offsets = np.r_[0, np.cumsum(lengths)]

    entries = []
    bounds = np.linspace(0, n, partitions + 1).astype(np.int64)
    for p, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        key = f"synthetic-{p:05d}"
        rows = np.arange(lo, hi)
        uids = u64_to_uid(uid[rows])
        urls = [f"http://img{u % 997}.example/{u}.jpg" for u in url_id[rows].tolist()]
        texts = [f"a picture {i}" for i in rows.tolist()]
        qlist = pa.ListArray.from_arrays(pa.array(offsets[lo:hi + 1] - offsets[lo], pa.int32()),
                                         pa.array(qids[offsets[lo]:offsets[hi]], pa.int32()))
        images = [pool[j] for j in picture[rows].tolist()]
        # A near copy is a re-encode: other bytes. Make them differ by one trailing byte after EOI.
        images = [b + b"\0" if near[r] else b for b, r in zip(images, rows.tolist())]
        # Pairs with one sha_id share bytes; the sha256 column says so (its first 16 digits are the id).
        sha = [f"{sha_id[r]:016x}" + pool_sha[picture[sha_id[r]]][16:] for r in rows.tolist()]
        sizes = np.array([len(b) for b in images])
        side = np.array([16 + (j % 33) for j in picture[rows].tolist()], np.int32)
        files = {"candidates": str(run_dir / "candidates" / f"part-{key}.parquet"),
                 "matched": str(run_dir / "matched" / f"part-{key}.parquet"),
                 "status": str(run_dir / "download" / f"part-{key}.parquet"),
                 "images": str(run_dir / "download" / "images" / f"part-{key}.parquet")}
        write_parquet(pa.table({"uid": uids, "url": urls, "text": texts, "page_url": [""] * len(rows),
                                "origin": [f"synthetic:{r}" for r in rows.tolist()],
                                "attribute": ["src:alt"] * len(rows)}), files["candidates"])
        write_parquet(pa.table({"uid": uids, "url": urls, "text": texts, "page_url": [""] * len(rows),
                                "query_ids": qlist}), files["matched"])
        status = pa.table({"uid": uids, "url": urls, "status": ["success"] * len(rows),
                           "sha256": sha, "phash": pa.array(phash[rows], pa.uint64()),
                           "width": pa.array(side, pa.int32()), "height": pa.array(side, pa.int32()),
                           "bytes": pa.array(sizes, pa.int64())})
        write_parquet(status, files["status"])
        schema = pa.schema([("uid", pa.string()), ("sha256", pa.string()), ("image", pa.binary())])
        with parquet_writer(files["images"], schema) as w:
            for a in range(0, len(rows), 1000):
                w.write_table(pa.table({"uid": uids[a:a + 1000], "sha256": sha[a:a + 1000],
                                        "image": pa.array(images[a:a + 1000], pa.binary())}, schema=schema))
        entries.append({"key": key, "fingerprint": fingerprint([name, n, partitions, seed, p]), "files": files,
                        "info": {"success": int(len(rows))}})
    write_manifest(run_dir, "download", entries, {})
    recipe_path = root / f"{name}.toml"
    doc = {"run": {"name": name, "root": str(root), "workers": 2},
           "queries": {"unigram_counts": "unused.txt", "wordnet": ""}, **(recipe or {})}
    recipe_path.write_text(tomli_w.dumps(doc))
    (run_dir / "recipe.toml").write_text(tomli_w.dumps(doc))
    np.savez_compressed(root / f"{name}-planted.npz", exact=np.flatnonzero(exact), near=np.flatnonzero(near),
                        same_url=np.flatnonzero(same_url), source=source, uid=uid, phash=phash)
    return recipe_path
