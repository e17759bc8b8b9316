"""Query list from the real 829k-line unigram table plus WordNet: how long, and how many per source.

    .venv/bin/python bench/unigram_table.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from queries.stage import build_query_list  # noqa: E402
from wit_builder.recipe import QuerySettings  # noqa: E402


def main() -> None:
    settings = QuerySettings().model_dump(mode="json")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        info = build_query_list(
            counts=[], unigram_table=str(REPO / "data/wordcounts/wikipedia-word-counts.txt.gz"),
            wordnet="/usr/share/wordnet", pageviews=[], settings=settings, out_dir=tmp)
        seconds = time.perf_counter() - t
        table = pq.read_table(Path(tmp) / "queries.parquet")
    print(f"unigram table (829,254 lines) + WordNet -> {info['entries']:,} entries in {seconds:.1f} s")
    print(f"  taken per source (quota order): {info['taken']}")
    both = sum(1 for s in table.column("sources").to_pylist() if len(s) > 1)
    print(f"  entries in more than one source: {both:,}")


if __name__ == "__main__":
    main()
