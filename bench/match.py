"""Caption matching: wit's matcher against per-caption Aho-Corasick loops, one core, same run.

Queries: 500,000 entries from the real Wikipedia unigram table plus WordNet 3.0. Captions: the real alt
texts of the bundled WARCs plus generated ones (words drawn by their Wikipedia frequency, with
capitals and punctuation), about 45 characters on average. Match sets are checked identical.
Also prints the WARC -> candidates throughput.

    .venv/bin/python bench/match.py [--captions N] [--smoke]

--smoke: 10,000 queries, 2,000 captions (500 for the baselines), one timed run (the test suite's check
that it still runs). Without the `bench` extra (pyahocorasick, ahocorasick-rs) only wit's side runs.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.candidates.stage import extract
from pipelines.match.matcher import QueryMatcher
from queries.stage import (
    QuerySettings,
    build_query_list,
)

TABLE = REPO / "data/wordcounts/wikipedia-word-counts.txt.gz"
WARCS = sorted((REPO / "data/warc").glob("*.warc.gz"))


def build_queries(tmp: Path, wordnet: int = 86_654, unigram: int = 413_346) -> tuple[list[str], list]:
    s = QuerySettings(min_count=20, size=wordnet + unigram,
                      quota={"wordnet": wordnet, "unigram": unigram, "bigram": 0, "title": 0})
    table = TABLE
    if unigram < 100_000:  # smoke: the table's most frequent lines are enough (it is sorted by count)
        table = tmp / "table.txt.gz"
        with gzip.open(TABLE, "rb") as src, gzip.open(table, "wb", compresslevel=1) as dst:
            dst.writelines(itertools.islice(src, 3 * unigram))
    wordnet_dir = "/usr/share/wordnet" if Path("/usr/share/wordnet/data.noun").exists() else ""  # make setup
    build_query_list([], str(table), wordnet_dir, [], s, str(tmp))
    table = pq.read_table(tmp / "queries.parquet")
    return table.column("query").to_pylist(), table.column("count").to_pylist()


def real_captions(tmp: Path) -> list[str]:
    texts, seconds, mb = [], 0.0, 0.0
    for i, warc in enumerate(WARCS):
        out = {"candidates": str(tmp / f"c{i}.parquet"), "rejects": str(tmp / f"r{i}.parquet")}
        t = time.perf_counter()
        extract(str(warc), "warc", "url", "caption", out)
        seconds += time.perf_counter() - t
        mb += warc.stat().st_size / 1e6
        texts += pq.read_table(out["candidates"]).column("text").to_pylist()
    print(f"WARC -> candidates: {mb:.1f} MB of .warc.gz in {seconds:.2f} s = {mb / seconds:.1f} MB/s per core")
    return texts


def generated_captions(n: int, seed: int = 0, vocabulary: int = 300_000) -> list[str]:
    words, counts = [], []
    with gzip.open(TABLE, "rt", encoding="utf-8") as f:
        for line in f:
            w, _, c = line.rstrip("\n").rpartition(";")
            if w and w[0].isalnum():
                words.append(w)
                counts.append(int(c))
            if len(words) == vocabulary:
                break
    p = np.array(counts, float)
    p /= p.sum()
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 12, n)
    picks = rng.choice(len(words), lengths.sum(), p=p)
    seps = rng.choice([" ", " ", " ", " ", " ", ", ", " - ", ": "], lengths.sum())
    out, k = [], 0
    for length in lengths:
        parts = [words[i] + seps[k + j] for j, i in enumerate(picks[k : k + length])]
        k += length
        parts[0] = parts[0].capitalize()
        out.append("".join(parts).rstrip(" ,-:") + ("." if length % 3 == 0 else ""))
    return out


def metaclip_spacing(text: str) -> str:
    spaced = f" {text} "
    for p in ",.;:?!`":
        spaced = spaced.replace(p, f" {p} ")
    for c in "\t\n\r":
        spaced = spaced.replace(c, " ")
    return spaced


def pyahocorasick_loop(queries, captions):
    """MetaCLIP's own loop: one automaton of " q " entries, one iter() per caption."""
    import ahocorasick

    t = time.perf_counter()
    automaton = ahocorasick.Automaton()
    for qid, q in enumerate(queries):
        key = f" {q} "
        if key in automaton:
            automaton.get(key).append(qid)
        else:
            automaton.add_word(key, [qid])
    automaton.make_automaton()
    build = time.perf_counter() - t
    t = time.perf_counter()
    out = [sorted({qid for _, ids in automaton.iter(metaclip_spacing(c)) for qid in ids}) for c in captions]
    return build, time.perf_counter() - t, out


def ahocorasick_rs_loop(queries, captions):
    import ahocorasick_rs

    t = time.perf_counter()
    keys: dict[str, list[int]] = {}
    for qid, q in enumerate(queries):
        keys.setdefault(f" {q} ", []).append(qid)
    patterns = list(keys)
    groups = [keys[p] for p in patterns]
    automaton = ahocorasick_rs.AhoCorasick(patterns)
    build = time.perf_counter() - t
    t = time.perf_counter()
    out = [sorted({qid for i in automaton.find_matches_as_indexes(metaclip_spacing(c), overlapping=True)
                   for qid in groups[i[0]]}) for c in captions]
    return build, time.perf_counter() - t, out


def best_rate(matcher: QueryMatcher, captions: pa.Array, repeats: int = 5) -> tuple[float, pa.Array]:
    matcher.match(captions.slice(0, 100))  # compile (cached on disk after the first run)
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = matcher.match(captions)
        best = min(best, time.perf_counter() - t)
    return len(captions) / best, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--captions", type=int, default=1_000_000)
    parser.add_argument("--baseline-captions", type=int, default=100_000)
    parser.add_argument("--smoke", action="store_true",
                        help="10,000 queries, 2,000 captions, 500 for the baselines, one timed run")
    args = parser.parse_args()
    repeats, quotas, vocabulary = 5, (86_654, 413_346), 300_000
    if args.smoke:
        args.captions, args.baseline_captions = 2_000, 500
        repeats, quotas, vocabulary = 1, (2_000, 8_000), 20_000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        queries, counts = build_queries(tmp, *quotas)
        real = real_captions(tmp)
    captions = real + generated_captions(max(args.captions - len(real), 0), vocabulary=vocabulary)
    print(f"{len(queries):,} queries; {len(captions):,} captions ({len(real)} real), "
          f"mean {sum(map(len, captions)) / len(captions):.1f} characters")
    array = pa.array(captions, pa.large_string())
    sample = captions[: args.baseline_captions]

    results = {}
    for mode in ("metaclip", "words"):
        matcher = QueryMatcher(queries, mode, counts)
        rate, result = best_rate(matcher, array, repeats)
        results[mode] = (rate, result)
        print(f"wit {mode:<8}  automaton built in {matcher.build_seconds:.1f} s, "
              f"{matcher.nbytes / 2**20:.0f} MiB; {rate:>12,.0f} captions/s per core "
              f"({sum(map(len, result.to_pylist())) / len(result):.1f} matches/caption)")

    wit_meta = results["metaclip"][1].to_pylist()[: len(sample)]
    ratios = []
    for name, loop in (("pyahocorasick loop (MetaCLIP)", pyahocorasick_loop),
                       ("ahocorasick-rs loop", ahocorasick_rs_loop)):
        try:
            build, seconds, out = loop(queries, sample)
        except ImportError as e:
            print(f"{name:<30} not installed ({e.name}): pip install -e '.[bench]'")
            continue
        rate = len(sample) / seconds
        same = "identical" if out == wit_meta else "DIFFERENT"
        ratios.append(f"{results['metaclip'][0] / rate:.1f}x the {name}")
        print(f"{name:<30} built in {build:.1f} s; {rate:>10,.0f} captions/s; match sets {same}; "
              f"wit metaclip is {results['metaclip'][0] / rate:.1f}x")
    print(f"ratio: {', '.join(ratios)}" if ratios else "ratio: n/a (no baseline)")


if __name__ == "__main__":
    main()
