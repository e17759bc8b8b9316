"""Many tiny partitions: what a step costs in tasks, files opened and read requests when the
partition count is a real crawl's (one per WAT file, ~90,000), without the crawl's data.

M lists of a few pairs each go through queries -> candidates -> filter -> match, and synthetic
download output (bench/synthetic.py) in M partitions of a few pairs through dedup -> balance ->
shards, with `wit run` on the local pool. For each step it prints: tasks, files opened and read
requests in all and of the largest task, bytes read, the gap before the step (planning, marker
checks, handing out the tasks) and the driver's peak memory over the run.

Goals: every step's read requests <= 16 x (M + B) (B: the step's buckets); no per-partition task's
files grow with M; driver peak <= 1 GB and planning <= 60 s per step at M = 100,000. The reference
is the smallest M, measured in the same run: the ratio line is the largest M's read requests per
(M + B) over the smallest's (flat: 1.0x).

    .venv/bin/python bench/partitions.py [--sizes 1000 10000 100000] [--work /tmp/wit-partitions]
    .venv/bin/python bench/partitions.py --smoke     # M = 20 and 80, well under a minute
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

ROWS = 4  # pairs per partition
TEXT_STAGES = ("queries", "candidates", "filter", "match")
CORPUS_STAGES = ("dedup", "balance", "shards")
BUCKETS = 16  # of every shuffle, so that M x B would show


def tiny_lists(folder: Path, m: int) -> list[str]:
    """m CSV lists of ROWS pairs; the second half repeats the first half's pairs (copies across
    partitions, for the duplicate shuffle to find)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(m):
        first = (i % max(m // 2, 1)) * ROWS
        path = folder / f"list{i:06d}.csv"
        path.write_text("url,caption\n" + "".join(f"http://img.example/{first + j}.jpg,a photo of a dog {first + j}\n"
                                                  for j in range(ROWS)))
        paths.append(str(path))
    return paths


def driver_peak(proc: subprocess.Popen, out: list) -> None:
    """The driver's peak RSS (VmHWM), polled until it exits."""
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]) * 1024)
        except (OSError, IndexError):
            pass
        time.sleep(0.05)
    out.append(peak)


def wit_run(recipe: Path, stages: tuple[str, ...]) -> tuple[float, int]:
    """`wit run` of `stages`: its wall seconds and the driver's peak RSS."""
    args = [sys.executable, "-m", "wit_builder.cli", "run", str(recipe)]
    for stage in stages:
        args += ["--stage", stage]
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak: list[int] = []
    watch = threading.Thread(target=driver_peak, args=(proc, peak), daemon=True)
    watch.start()
    _, stderr = proc.communicate()
    watch.join()
    if proc.returncode:
        sys.exit(f"wit run failed:\n{stderr[-3000:]}")
    return time.perf_counter() - start, peak[0] if peak else 0


def step_of(key: str) -> str:
    """A marker's step: `partition` (one task per partition), or the step's own name (bucket, outputs...)."""
    if not key.startswith("_"):
        return "decide" if key.endswith(".decide") else "partition"
    return key[1:].split("-")[0]


def steps(run_dir: Path, stages: tuple[str, ...]) -> list[dict]:
    """Per stage and step, in the order they ran: tasks, files and requests (all, largest task), bytes
    read, and the gap before the step's first task began (planning and marker checks)."""
    rows, last_end = [], None
    for stage in stages:
        found: dict[str, dict] = {}
        for marker in sorted((run_dir / "_state" / stage).glob("*.json")):
            if marker.name == "_manifest.json":
                continue
            body = json.loads(marker.read_text())
            cost, end = body["cost"], body["finished"]
            s = found.setdefault(step_of(marker.stem), {"stage": stage, "tasks": 0, "files": 0, "requests": 0,
                                                        "max_files": 0, "max_requests": 0, "bytes": 0,
                                                        "start": end, "end": 0.0})
            s["tasks"] += 1
            s["files"] += cost["files_read"]
            s["requests"] += cost["read_requests"]
            s["max_files"] = max(s["max_files"], cost["files_read"])
            s["max_requests"] = max(s["max_requests"], cost["read_requests"])
            s["bytes"] += cost.get("bytes_read", 0)
            s["start"] = min(s["start"], end - cost["seconds"])
            s["end"] = max(s["end"], end)
        for name, s in sorted(found.items(), key=lambda kv: kv[1]["start"]):
            s["step"] = name
            s["gap"] = s["start"] - last_end if last_end is not None else 0.0
            last_end = s["end"]
            rows.append(s)
    return rows


def measure(work: Path, m: int) -> dict:
    """Both pipelines at M partitions: their steps, wall seconds and driver peaks."""
    import synthetic

    root = work / "runs"
    (work / "words.txt").write_text("photo;1000\ndog;1000\n")
    text = work / f"text-{m}.toml"
    text.write_text(tomli_w.dumps({
        "run": {"name": f"text-{m}", "root": str(root), "workers": 2},
        "queries": {"unigram_counts": str(work / "words.txt"), "wordnet": ""},
        "candidates": {"inputs": tiny_lists(work / f"lists-{m}", m), "buckets": BUCKETS}}))
    text_seconds, text_peak = wit_run(text, TEXT_STAGES)
    corpus = synthetic.build(root, f"corpus-{m}", ROWS * m, m, seed=1, pool=64, recipe={
        "run": {"name": f"corpus-{m}", "root": str(root), "workers": 2},
        "dedup": {"buckets": BUCKETS}, "shards": {"buckets": BUCKETS, "samples_per_shard": 1000}})
    corpus_seconds, corpus_peak = wit_run(corpus, CORPUS_STAGES)
    return {"m": m, "steps": steps(root / f"text-{m}", TEXT_STAGES) + steps(root / f"corpus-{m}", CORPUS_STAGES),
            "seconds": {"text": text_seconds, "corpus": corpus_seconds}, "peak": max(text_peak, corpus_peak)}


def report(result: dict) -> bool:
    """Print one M's table; whether every step met the request goal."""
    m, ok = result["m"], True
    print(f"\nM = {m:,} partitions of {ROWS} pairs, B = {BUCKETS} buckets per shuffle; "
          f"wall {result['seconds']['text']:.1f} s (text stages), {result['seconds']['corpus']:.1f} s (corpus stages); "
          f"driver peak {result['peak'] / 2**20:.0f} MB")
    print(f"{'stage':<11}{'step':<11}{'tasks':>8}{'files':>10}{'requests':>10}{'max files':>11}{'max req':>9}"
          f"{'MB read':>9}{'gap s':>8}  goal: requests <= 16 (M + B)")
    for s in result["steps"]:
        within = s["requests"] <= 16 * (m + BUCKETS)
        ok &= within
        print(f"{s['stage']:<11}{s['step']:<11}{s['tasks']:>8,}{s['files']:>10,}{s['requests']:>10,}{s['max_files']:>11,}"
              f"{s['max_requests']:>9,}{s['bytes'] / 2**20:>9.1f}{s['gap']:>8.2f}  {'ok' if within else 'MISSED'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="M = 20 and 80")
    args = parser.parse_args()
    sizes = [20, 80] if args.smoke else sorted(args.sizes)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="wit-partitions-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = [measure(work, m) for m in sizes]
    met = all([report(r) for r in results])

    def per_partition(r):
        return sum(s["requests"] for s in r["steps"]) / (r["m"] + BUCKETS)

    first, last = results[0], results[-1]
    print(f"\nread requests goal (<= 16 x (M + B) per step): {'met' if met else 'MISSED'}; driver peak at "
          f"M = {last['m']:,}: {last['peak'] / 2**20:.0f} MB (goal <= 1 GB at 100,000)")
    print(f"ratio: {per_partition(last) / per_partition(first):.2f}x read requests per (M + B) at M = {last['m']:,} "
          f"over M = {first['m']:,} (reference, same run; flat is 1.0x)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
