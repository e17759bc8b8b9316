"""Dump -> counts: wit's counter against mwxml + mwparserfromhell, one core each, same sample.

Prints MB of XML per second per core for both, the ratio, how far the unigram counts agree, and the
extrapolated time for the full English Wikipedia on 16 cores.

    .venv/bin/python bench/dump_counting.py [DUMP.xml.bz2]
"""

from __future__ import annotations

import bz2
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import mwxml
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from baselines import mwparser_plain_text  # noqa: E402
from queries.counting import OUTPUTS, TokenCounter, count_part  # noqa: E402

FULL_ENWIKI_XML_GB = 22
CORES = 16


def wit_counts(dump: Path, out: Path) -> tuple[float, Counter]:
    """Best of three runs of wit's partition counter over the whole file."""
    outputs = {n: str(out / f"{n}.parquet") for n in OUTPUTS}
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        count_part(str(dump), 0, None, outputs)
        best = min(best, time.perf_counter() - t)
    table = pq.read_table(outputs["unigrams"]).to_pylist()
    return best, Counter({r["token"]: r["count"] for r in table})


def baseline_counts(xml: Path) -> tuple[float, Counter]:
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


def main() -> None:
    dump = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "data/wikipedia/enwiki-sample.xml.bz2"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        xml = tmp / "dump.xml"
        xml.write_bytes(bz2.decompress(dump.read_bytes()))
        mb = xml.stat().st_size / 1e6
        print(f"sample: {dump.name}, {mb:.1f} MB of XML, one core each")

        t_wit, ours = wit_counts(xml, tmp)
        t_bz2, _ = wit_counts(dump, tmp)
        t_ref, theirs = baseline_counts(xml)

        print(f"  wit (xml)                 {t_wit:6.2f} s  {mb / t_wit:6.2f} MB/s per core")
        print(f"  wit (bz2, incl. decomp.)  {t_bz2:6.2f} s  {mb / t_bz2:6.2f} MB/s per core")
        print(f"  mwxml + mwparserfromhell  {t_ref:6.2f} s  {mb / t_ref:6.2f} MB/s per core")
        print(f"  ratio wit / baseline: {t_ref / t_wit:.1f}x (xml), {t_ref / t_bz2:.1f}x (bz2)")

        words = set(ours) | set(theirs)
        l1 = sum(abs(ours[w] - theirs[w]) for w in words) / sum(theirs.values())
        top = [w for w, _ in theirs.most_common(500)]
        within = sum(abs(ours[w] - theirs[w]) <= 0.05 * theirs[w] for w in top)
        print(f"  unigram agreement: tokens {sum(ours.values()):,} vs {sum(theirs.values()):,}; "
              f"L1 difference {l1:.1%} of tokens; {within}/500 top words within 5%")

        minutes = FULL_ENWIKI_XML_GB * 1e3 / (mb / t_bz2) / CORES / 60
        print(f"  full English Wikipedia (~{FULL_ENWIKI_XML_GB} GB XML) on {CORES} cores: "
              f"~{minutes:.0f} min (wit, from bz2) vs ~{minutes * t_ref / t_bz2:.0f} min (baseline)")


if __name__ == "__main__":
    main()
