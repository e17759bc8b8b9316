"""Dedup, balancing and shards: the corpus itself."""

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, wit
from PIL import Image
from test_download import ARCHIVE, archive_images, make_run

from pipelines.dedup.neardup import blocks, brute_force_pairs, close_pairs, near_duplicate_pairs
from pipelines.download.miniweb import MiniWeb
from pipelines.phash import flatten_on_white, has_alpha, phash_bytes
from pipelines.sampling import keep_mask
from wit_builder.tar import safe_key


def real_images():
    with MiniWeb([ARCHIVE]) as web:
        return [b for (_, _, b) in web.captures.values() if b[:3] in (b"\xff\xd8\xff", b"GIF", b"\x89PN")]


def test_phash_equals_imagehash_on_the_same_decode():
    images = real_images()
    hashes, ok = phash_bytes(images)
    assert ok.all() and len(images) > 50
    def decoded(data, draft):  # the same decode; transparency flattened onto white, as stored
        im = Image.open(io.BytesIO(data))
        if draft and im.format == "JPEG":
            im.draft("L", (64, 64))
        return flatten_on_white(im) if has_alpha(im) else im

    assert any(has_alpha(Image.open(io.BytesIO(d))) for d in images)
    for data, h in zip(images, hashes):
        assert int(str(imagehash.phash(decoded(data, True))), 16) == int(h)
    full, _ = phash_bytes(images, draft=False)
    for data, h in zip(images, full):
        assert int(str(imagehash.phash(decoded(data, False))), 16) == int(h)


@pytest.mark.parametrize("r", [2, 3])
@pytest.mark.parametrize("k", [0, 2, 4, 6])
def test_near_duplicate_search_equals_brute_force(k, r):
    rng = np.random.default_rng(k)
    hashes = rng.integers(0, 2**64 - 1, 3000, dtype=np.uint64)
    src, dst = rng.choice(3000, (2, 300), replace=False)
    for a, b in zip(src, dst):  # plant pairs at every distance up to k + 1
        flips = rng.choice(64, rng.integers(0, k + 2), replace=False)
        hashes[b] = hashes[a] ^ np.uint64(sum(1 << int(f) for f in flips))
    i, j, d = near_duplicate_pairs(hashes, k, r=r)
    assert set(zip(i.tolist(), j.tolist())) == brute_force_pairs(hashes, k)
    assert (d <= k).all() and len(i) >= 1
    assert len(set(zip(i.tolist(), j.tolist()))) == len(i)  # each pair once


@pytest.mark.parametrize("r", [2, 3])
def test_close_pairs_split_by_lead_block_find_each_pair_once(r):
    """As dedup's buckets split the search: each hash searched under some of its lead blocks in one
    place and the rest in another finds every close pair exactly once over both. Dense clusters (a few
    bases, each with many copies a few bits away) make pairs agree on many blocks at once."""
    k = 4
    rng = np.random.default_rng(r)
    bases = rng.integers(0, 2**64 - 1, 40, dtype=np.uint64)
    hashes = bases[rng.integers(0, 40, 2000)].copy()
    for row in range(len(hashes)):
        for bit in rng.choice(64, rng.integers(0, 4), replace=False):
            hashes[row] ^= np.uint64(1) << np.uint64(bit)
    everything = (1 << (k + 1)) - 1
    # Lead block i goes here when its value is odd (a bucket by key): hashes sharing it go together.
    here = sum(((hashes >> np.uint64(shift)) & np.uint64(1)).astype(np.uint32) << np.uint32(i)
               for i, (shift, _) in enumerate(blocks(k + r)[: k + 1]))
    found = [tuple(p) for leads in (here, everything - here)
             for p in zip(*(x.tolist() for x in close_pairs(hashes, leads, k, r)))]
    assert len(found) == len(set(found))
    assert set(found) == brute_force_pairs(hashes, k)
    assert len(found) > 10_000


def synthetic(n_rows, rng):
    """Rows with one to three query ids drawn from a long-tailed distribution."""
    lengths = rng.integers(1, 4, n_rows)
    offsets = np.r_[0, np.cumsum(lengths)]
    qids = np.minimum(rng.zipf(1.3, offsets[-1]) - 1, 999).astype(np.int64)
    uid64 = rng.integers(0, 2**63, n_rows, dtype=np.uint64)
    return uid64, offsets, qids


def test_balance_is_the_same_on_any_partitioning():
    rng = np.random.default_rng(0)
    uid64, offsets, qids = synthetic(20_000, rng)
    counts = np.bincount(qids, minlength=1000)
    whole = keep_mask(uid64, offsets, qids, counts, 50, seed=7)
    parts = []
    for lo, hi in [(0, 5000), (5000, 12345), (12345, 20000)]:
        o = offsets[lo : hi + 1]
        parts.append(keep_mask(uid64[lo:hi], o - o[0], qids[o[0] : o[-1]], counts, 50, seed=7))
    assert (np.concatenate(parts) == whole).all()
    assert not (keep_mask(uid64, offsets, qids, counts, 50, seed=8) == whole).all()  # seeded
    assert keep_mask(uid64, offsets, qids, counts, 10**9, seed=7).all()  # t above every count


def test_balance_statistics():
    """One query per pair: a head query keeps Binomial(count, t/count) pairs, within a 4-sigma
    interval of t; tail queries are kept whole."""
    rng = np.random.default_rng(1)
    t = 1000
    sizes = {0: 50_000, 1: 20_000, 2: 5_000, 3: 999, 4: 10}
    qids = np.concatenate([np.full(n, q) for q, n in sizes.items()])
    uid64 = rng.integers(0, 2**63, len(qids), dtype=np.uint64)
    keep = keep_mask(uid64, np.arange(len(qids) + 1), qids, np.bincount(qids), t, seed=0)
    for q, n in sizes.items():
        kept = int(keep[qids == q].sum())
        if n <= t:
            assert kept == n
        else:
            p = t / n
            assert abs(kept - t) <= 4 * math.sqrt(n * p * (1 - p)), (q, kept)


@pytest.mark.parametrize("name, size", [("a.jpg", 0), ("0123456789abcdef.json", 511), ("k.txt", 10**9)])
def test_tar_headers_are_tarfiles_own(name, size):
    from wit_builder.tar import tar_header

    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o444
    assert tar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)


@pytest.mark.parametrize("key, safe", [("../../etc/passwd", "etc_passwd"), (".hidden", "hidden"),
                                       ("a/b\\c", "a_b_c"), ("..", "sample"), ("ok_key-1", "ok_key-1")])
def test_member_names_are_sanitised(key, safe):
    assert safe_key(key) == safe


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    """One run through every stage on the miniature web, with planted duplicates and an evaluation
    image; the tests below read it."""
    tmp_path = tmp_path_factory.mktemp("corpus")
    planted = [
        ("http://faults.wit.test/ok/a.jpg", "a bicycle one"), ("http://faults.wit.test/ok/b.jpg", "a bicycle two"),
        ("http://faults.wit.test/ok/a.jpg", "a bicycle with another text"),  # same URL, new text
        ("http://faults.wit.test/variant/50.jpg", "a bicycle re-encoded"),
        ("http://faults.wit.test/fashion/0.jpg", "a boot from the evaluation set"),
    ]
    rows = planted + [(u, f"a picture {i}") for i, u in enumerate(archive_images(20))]
    recipe, run_dir = make_run(tmp_path, "corpus", rows, {"replay": [str(ARCHIVE)], "allow_loopback": True},
                               words=("a", "bicycle", "with", "another", "text"))
    recipe.write_text(recipe.read_text() + (
        '\n[dedup]\nradius = 4\neval_sets = [{ name = "fmnist", kind = "fashion-mnist", '
        'path = "/usr/share/datasets/fashion-mnist" }]\n[balance]\nt = 5\noversample = 0\n[shards]\nsamples_per_shard = 4\n'))
    wit("run", recipe)
    return recipe, run_dir


@pytest.mark.slow
def test_dedup_rules(corpus_run):
    _, run_dir = corpus_run
    dedup = {r["uid"]: r for r in pq.read_table(run_dir / "dedup/part-corpus.csv.parquet").to_pylist()}
    matched = {r["uid"]: r for r in pq.read_table(run_dir / "matched/part-corpus.csv.parquet").to_pylist()}
    by_text = {matched[u]["text"]: d for u, d in dedup.items()}
    # One group of four (same bytes, same URL, re-encoded); the one kept matches the most queries.
    kept = [t for t, d in by_text.items() if "bicycle" in t and d["keep"]]
    assert kept == ["a bicycle with another text"]
    keeper = by_text[kept[0]]
    group = {t: d["reason"] for t, d in by_text.items() if "bicycle" in t and not d["keep"]}
    assert group == {"a bicycle one": "exact_image", "a bicycle two": "exact_image",
                     "a bicycle re-encoded": "near_duplicate"}
    assert all(d["dup_of"] == keeper["uid"] for t, d in by_text.items() if "bicycle" in t and not d["keep"])
    boot = by_text["a boot from the evaluation set"]
    assert boot["reason"] == "eval_overlap" and boot["dup_of"].startswith("fmnist:")


@pytest.mark.slow
def test_balancing_bites(corpus_run):
    _, run_dir = corpus_run
    # With t = 5, the query "a" (in every caption) keeps about 5 of its pairs.
    balanced = pq.read_table(run_dir / "balanced").to_pylist()
    assert 3 <= sum(r["keep"] for r in balanced) < len(balanced)


@pytest.mark.slow
def test_shards_read_with_three_readers(corpus_run):
    import webdataset as wds
    import wids

    _, run_dir = corpus_run
    balanced = pq.read_table(run_dir / "balanced").to_pylist()
    matched = {r["uid"]: r for r in pq.read_table(run_dir / "matched/part-corpus.csv.parquet").to_pylist()}
    shards = sorted((run_dir / "shards").glob("*.tar"))
    sizes = json.loads((run_dir / "shards/sizes.json").read_text())
    assert [s.name for s in shards] == sorted(sizes) and sum(sizes.values()) == sum(r["keep"] for r in balanced)
    listing = subprocess.run(["tar", "-tf", str(shards[0])], capture_output=True, text=True, check=True).stdout.split()
    assert len(listing) == 3 * sizes[shards[0].name] and all("/" not in n and not n.startswith(".") for n in listing)
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert len(samples) == sum(sizes.values())
    for s in samples:
        Image.open(io.BytesIO(s["jpg"])).load()
        meta = json.loads(s["json"])
        assert meta["uid"] == s["__key__"] and meta["queries"] and len(meta["phash"]) == 16
        assert s["txt"].decode() == matched[meta["uid"]]["text"]
    dataset = wids.ShardListDataset(str(run_dir / "shards" / "wids.json"))
    assert len(dataset) == len(samples) and dataset[0][".json"]["uid"] == samples[0]["__key__"]
    order = [s["__key__"] for s in samples]
    # The global order is the hash of (uid, seed), not uid or partition order.
    from wit_builder.shuffle import splitmix64, uid_to_u64

    rank = splitmix64(uid_to_u64(order) ^ splitmix64(np.uint64(0)))
    assert (np.diff(rank.astype(np.float64)) > 0).all() and order != sorted(order)
    shard_rows = pq.read_table(run_dir / "shards/shards.parquet").to_pylist()
    assert {r["uid"] for r in shard_rows} == set(order)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_report_in_headless_chromium(corpus_run, tmp_path):
    from playwright.sync_api import sync_playwright

    _, run_dir = corpus_run
    report = tmp_path / "report.html"
    wit("report", run_dir, "-o", report)
    stats = [json.loads(line) for line in wit("stats", run_dir, "--json").stdout.splitlines()]
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        plots = page.eval_on_selector_all("img.plot", "els => els.map(e => [e.dataset.plot, e.naturalWidth])")
        thumbs = page.eval_on_selector_all("img.thumb", "els => els.map(e => e.naturalWidth)")
        tables = page.eval_on_selector_all(
            "section[data-report]", "els => els.map(s => Array.from(s.querySelectorAll('tbody tr')).map("
            "r => Array.from(r.cells).map(c => c.textContent)))")
        page.screenshot(path=str(REPO / "runs" / "report-test.png"), full_page=True)
        browser.close()
    assert errors == []
    assert {"funnel", "per_query", "sizes", "sources"} <= {name for name, _ in plots}  # reasons: when any
    assert all(width > 100 for _, width in plots) and thumbs and all(w > 0 for w in thumbs)
    # The numbers on the page are wit stats' numbers.
    assert len(tables) == len(stats)
    for table, report_json in zip(tables, stats):
        expected = [["" if v is None else str(v) for v in row.values()] for row in report_json["rows"]]
        assert table == expected, report_json["title"]


@pytest.mark.slow
def test_shard_stage_killed_mid_way_then_rerun_gives_identical_tars(corpus_run):
    recipe, run_dir = corpus_run
    shards = sorted((run_dir / "shards").glob("*.tar"))
    reference = {s.name: s.read_bytes() for s in shards}
    shutil.rmtree(run_dir / "shards")
    shutil.rmtree(run_dir / "_state" / "shards")
    proc = subprocess.Popen([sys.executable, "-m", "wit_builder.cli", "run", str(recipe), "--stage", "shards"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run_dir / "_state" / "shards"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(state.glob("0*.json"))) < 1:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wit("run", recipe, "--stage", "shards")
    assert {s.name: s.read_bytes() for s in sorted((run_dir / "shards").glob("*.tar"))} == reference
    assert not list((run_dir / "shards").glob(".*tmp*"))
    with tarfile.open(shards[0]) as tf:
        assert all(m.isfile() for m in tf)
