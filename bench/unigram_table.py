"""Query list from the real 829k-line unigram table plus WordNet: how long, and how many per source.

The reference, measured in the same run, is the floor any reader of the table pays: decompressing it
and splitting its lines into (word, count). The ratio is the query list's time over that floor.

    .venv/bin/python bench/unigram_table.py [--lines N] [--smoke]

--smoke: the table's first 20,000 lines (the test suite's check that it still runs). Without WordNet
(/usr/share/wordnet, `make setup`) the list is built from the table alone.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from queries.stage import (
    QuerySettings,
    build_query_list,
)

TABLE = REPO / "data/wordcounts/wikipedia-word-counts.txt.gz"
WORDNET = Path("/usr/share/wordnet")
SMOKE_LINES = 20_000


def read_floor(table: Path) -> float:
    """Seconds to decompress the table and split every line into (word, count)."""
    t = time.perf_counter()
    with gzip.open(table, "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").rpartition(";")[::2] for line in f]
    seconds = time.perf_counter() - t
    assert rows
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=0, help="only the table's first N lines (0: all)")
    parser.add_argument("--smoke", action="store_true", help=f"--lines {SMOKE_LINES}")
    args = parser.parse_args()
    lines = SMOKE_LINES if args.smoke and not args.lines else args.lines
    settings = QuerySettings()
    wordnet = str(WORDNET) if (WORDNET / "data.noun").exists() else ""
    if not wordnet:
        print(f"WordNet not found at {WORDNET} (make setup): the table alone")
    with tempfile.TemporaryDirectory() as tmp:
        table = TABLE
        if lines:
            table = Path(tmp) / "table.txt.gz"
            with gzip.open(TABLE, "rb") as src, gzip.open(table, "wb", compresslevel=6) as dst:
                dst.writelines(itertools.islice(src, lines))
        t = time.perf_counter()
        info = build_query_list(counts=[], unigram_table=str(table), wordnet=wordnet, pageviews=[],
                                settings=settings, out_dir=tmp)
        seconds = time.perf_counter() - t
        result = pq.read_table(Path(tmp) / "queries.parquet")
        floor = read_floor(table)
    size = f"first {lines:,} lines" if lines else "829,254 lines"
    print(f"unigram table ({size}){' + WordNet' if wordnet else ''} -> {info['entries']:,} entries "
          f"in {seconds:.1f} s")
    print(f"  taken per source (quota order): {info['taken']}")
    both = sum(1 for s in result.column("sources").to_pylist() if len(s) > 1)
    print(f"  entries in more than one source: {both:,}")
    print(f"  reading the table's lines alone (the floor): {floor:.2f} s")
    print(f"ratio: {seconds / floor:.1f}x the time to read the table (lower is better)")


if __name__ == "__main__":
    main()
