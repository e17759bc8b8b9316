"""Dump -> counts: wit's counter against mwxml + mwparserfromhell, one core each, same sample.

Prints MB of XML per second per core for both, the ratio, how far the unigram counts agree, and the
extrapolated time for the full English Wikipedia on 16 cores.

    .venv/bin/python bench/dump_counting.py [DUMP.xml.bz2] [--smoke]

--smoke: the first few pages of the dump, one run each (the test suite's check that it still runs).
Without the `bench` extra (mwxml, mwparserfromhell) only wit's side runs.
"""

from __future__ import annotations

import argparse
import bz2
import importlib.util
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from queries.counting import OUTPUTS, TokenCounter, count_part

FULL_ENWIKI_XML_GB = 22
CORES = 16
SMOKE_PAGES = 8


def wit_counts(dump: Path, out: Path, repeats: int = 3) -> tuple[float, Counter]:
    """Best of `repeats` runs of wit's partition counter over the whole file."""
    outputs = {n: str(out / f"{n}.parquet") for n in OUTPUTS}
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        count_part(str(dump), 0, None, outputs)
        best = min(best, time.perf_counter() - t)
    table = pq.read_table(outputs["unigrams"]).to_pylist()
    return best, Counter({r["token"]: r["count"] for r in table})


def baseline_counts(xml: Path) -> tuple[float, Counter]:
    import mwxml
    from baselines import mwparser_plain_text

    t = time.perf_counter()
    counter = TokenCounter()
    dump = mwxml.Dump.from_file(open(xml, "rb"))
    for page in dump:
        if page.namespace != 0 or page.redirect:
            continue
        for revision in page:
            counter.add(mwparser_plain_text(revision.text or ""))
    unigrams, _ = counter.finish()
    return time.perf_counter() - t, unigrams


def first_pages(xml: bytes, pages: int) -> bytes:
    """The dump's header and its first `pages` pages, closed as a whole dump."""
    end = 0
    for _ in range(pages):
        end = xml.index(b"</page>", end) + len(b"</page>")
    return xml[:end] + b"\n</mediawiki>\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dump", nargs="?", type=Path, default=REPO / "data/wikipedia/enwiki-sample.xml.bz2")
    parser.add_argument("--smoke", action="store_true", help=f"the first {SMOKE_PAGES} pages, one run each")
    args = parser.parse_args()
    repeats = 1 if args.smoke else 3
    missing = [m for m in ("mwxml", "mwparserfromhell") if importlib.util.find_spec(m) is None]
    baseline = not missing
    if missing:
        print(f"baseline not installed ({', '.join(missing)}): pip install -e '.[bench]'; measuring wit only")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        xml = tmp / "dump.xml"
        data = bz2.decompress(args.dump.read_bytes())
        dump = args.dump
        if args.smoke:
            data = first_pages(data, SMOKE_PAGES)
            dump = tmp / "dump.xml.bz2"
            dump.write_bytes(bz2.compress(data))
        xml.write_bytes(data)
        mb = xml.stat().st_size / 1e6
        print(f"sample: {args.dump.name}{f' (first {SMOKE_PAGES} pages)' if args.smoke else ''}, "
              f"{mb:.1f} MB of XML, one core each")

        t_wit, ours = wit_counts(xml, tmp, repeats)
        t_bz2, _ = wit_counts(dump, tmp, repeats)
        print(f"  wit (xml)                 {t_wit:6.2f} s  {mb / t_wit:6.2f} MB/s per core")
        print(f"  wit (bz2, incl. decomp.)  {t_bz2:6.2f} s  {mb / t_bz2:6.2f} MB/s per core")
        if not baseline:
            print("ratio: n/a (no baseline)")
            return
        t_ref, theirs = baseline_counts(xml)
        print(f"  mwxml + mwparserfromhell  {t_ref:6.2f} s  {mb / t_ref:6.2f} MB/s per core")

        words = set(ours) | set(theirs)
        l1 = sum(abs(ours[w] - theirs[w]) for w in words) / sum(theirs.values())
        top = [w for w, _ in theirs.most_common(500)]
        within = sum(abs(ours[w] - theirs[w]) <= 0.05 * theirs[w] for w in top)
        print(f"  unigram agreement: tokens {sum(ours.values()):,} vs {sum(theirs.values()):,}; "
              f"L1 difference {l1:.1%} of tokens; {within}/{len(top)} top words within 5%")

        minutes = FULL_ENWIKI_XML_GB * 1e3 / (mb / t_bz2) / CORES / 60
        print(f"  full English Wikipedia (~{FULL_ENWIKI_XML_GB} GB XML) on {CORES} cores: "
              f"~{minutes:.0f} min (wit, from bz2) vs ~{minutes * t_ref / t_bz2:.0f} min (baseline)")
        print(f"ratio: {t_ref / t_wit:.1f}x the baseline (xml), {t_ref / t_bz2:.1f}x (bz2)")


if __name__ == "__main__":
    main()
