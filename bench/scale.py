"""dedup -> balance -> shards on synthetic corpora of growing size (bench/synthetic.py): whether the
cost per sample stays flat, memory stays bounded and I/O stays a small multiple of the corpus.

The reference is the smallest size, measured in the same run: the time per sample of each larger
size is reported as a ratio to it (goal <= 1.25x). Also: task and driver peak memory (goal <= 2 GB),
bytes read by all tasks over the corpus (goal <= 3x), images per second per core through dedup's
map and bucket steps (the near-duplicate search alone is bench/neardup.py), and recall of the
planted exact and near copies (must be 1.0). Then an extrapolation to 400M kept pairs out of 2B
downloaded images.

    .venv/bin/python bench/scale.py [--sizes 1000000 4000000] [--partition 250000] [--work /tmp/wit-scale]
    .venv/bin/python bench/scale.py --smoke     # 5,000 and 20,000 pairs, well under a minute

Each size is measured in a fresh subprocess, so sizes do not share a peak RSS; generating the
corpus happens before it, in this process, and is timed apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

STAGES = ("dedup", "balance", "shards")
MB = 1 << 20
CODE = ["pipelines/dedup/stage.py", "pipelines/balance.py", "pipelines/shard.py", "pipelines/dedup/neardup.py",
        "wit_builder/runner.py", "wit_builder/stage.py", "wit_builder/shuffle.py", "wit_builder/workspace.py",
        "wit_builder/tar.py"]


# --- one size, in a subprocess ---------------------------------------------------------------------


class PeakWatch(threading.Thread):
    """The driver's peak RSS, polled from VmHWM. Not ru_maxrss: a process started by fork + exec
    inherits its parent's ru_maxrss (here, the memory that generated the corpus), and a task run in
    the driver (as LocalExecutor(1) does) resets the watermark to measure itself, losing earlier
    peaks; polling the watermark every 10 ms keeps them."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0

    def reset(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")
        self.peak = 0

    def run(self) -> None:
        while True:
            status = Path("/proc/self/status").read_text()
            self.peak = max(self.peak, int(status.split("VmHWM:")[1].split()[0]) * 1024)
            time.sleep(0.01)


def step_of(stage: str, key: str) -> str:
    """A marker's step: map (per partition), decide, bucket, or a one-task step (group, reduce)."""
    if key.startswith("_bucket-"):
        return "bucket"
    if key.startswith("_"):
        return key[1:]
    return "decide" if stage == "dedup" and key.endswith(".decide") else "map"


def task_costs(run_dir: Path) -> dict:
    """Per stage and step: tasks, cpu seconds, bytes read and written, max peak RSS."""
    out = {}
    for stage in STAGES:
        steps = out[stage] = {}
        for marker in sorted((run_dir / "_state" / stage).glob("*.json")):
            if marker.name == "_manifest.json":
                continue
            cost = json.loads(marker.read_text())["cost"]
            s = steps.setdefault(step_of(stage, marker.stem), {"tasks": 0, "cpu": 0.0, "read": 0, "written": 0,
                                                                 "peak": 0})
            s["tasks"] += 1
            s["cpu"] += cost["cpu_seconds"]
            s["read"] += cost.get("bytes_read", 0)
            s["written"] += cost.get("bytes_written", 0)
            s["peak"] = max(s["peak"], cost.get("peak_rss", 0))
    return out


def folder_bytes(*folders: Path) -> int:
    return sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())


def recall(run_dir: Path, planted: Path) -> dict:
    """Planted copies i (of row source[i]) must end in their source's group: same keeper."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from wit_builder.shuffle import uid_to_u64
    from wit_builder.workspace import read_table

    p = np.load(planted)
    t = pa.concat_tables(read_table(f, columns=["uid", "keep", "dup_of"])
                         for f in sorted((run_dir / "dedup").glob("part-*.parquet")))
    uid = uid_to_u64(t.column("uid"))
    # No evaluation sets here, so dup_of is always a uid, and it is the group's keeper itself.
    keeper = uid_to_u64(pc.if_else(t.column("keep"), t.column("uid"), t.column("dup_of")))
    order = np.argsort(uid)

    def keeper_of(rows):
        at = order[np.minimum(np.searchsorted(uid, p["uid"][rows], sorter=order), len(uid) - 1)]
        assert (uid[at] == p["uid"][rows]).all(), "a planted row is missing from dedup's output"
        return keeper[at]

    def share(copies):
        return float((keeper_of(copies) == keeper_of(p["source"][copies])).mean()) if len(copies) else 1.0

    copies = np.r_[p["exact"], p["near"]]
    planted_total = len(np.unique(np.r_[copies, p["same_url"]]))
    return {"recall": share(copies), "pairs": len(copies), "url_recall": share(p["same_url"]),
            "removed": int(t.num_rows - pc.sum(t.column("keep")).as_py()), "planted": planted_total}


def measure(recipe: str, planted: str, workers: int) -> dict:
    import pyarrow.compute as pc

    from pipelines.balance import BalanceStage
    from pipelines.dedup.stage import DedupStage
    from pipelines.shard import ShardStage
    from wit_builder.recipe import load_recipe
    from wit_builder.runner import LocalExecutor, run_stage
    from wit_builder.workspace import Run, read_table

    run = Run(load_recipe(recipe))
    watch = PeakWatch()
    watch.start()
    executor = LocalExecutor(workers)  # one pool for all three stages, as `wit run` does
    wall, driver = {}, {}
    for stage in (DedupStage(), BalanceStage(), ShardStage()):
        watch.reset()
        start = time.perf_counter()
        run_stage(stage, run, executor)
        wall[stage.name] = time.perf_counter() - start
        time.sleep(0.02)  # one more poll
        driver[stage.name] = watch.peak
    executor.close()
    d = run.dir
    balance = json.loads((d / "_state/balance/_manifest.json").read_text())["partitions"]
    corpus, image_files = folder_bytes(d / "candidates", d / "matched", d / "download"), folder_bytes(d / "download" / "images")
    # The synthetic pictures (a pool of 4,096) compress in parquet; real JPEGs do not: the corpus
    # with its images at their own size is the fairer denominator for bytes read.
    images = sum(pc.sum(read_table(f, columns=["bytes"]).column("bytes")).as_py() or 0
                 for f in (d / "download").glob("part-*.parquet"))
    return {"wall": wall, "driver_peak": driver, "steps": task_costs(d), "corpus": corpus,
            "corpus_raw": corpus - image_files + images, "image_files": image_files,
            "kept": sum(p["info"]["kept"] for p in balance), "kept_bytes": sum(p["info"]["kept_bytes"] for p in balance),
            **recall(d, Path(planted))}


# --- the driver of the benchmark -------------------------------------------------------------------


PICTURES = 65_536  # distinct pictures (smoke: 4,096): few repeat within a row group, so images compress as real ones do


def run_size(n: int, partition: int, work: Path, workers: int, pictures: int) -> dict:
    import synthetic

    name = f"scale-{n}"
    start = time.perf_counter()
    recipe = synthetic.build(work, name, n, max(1, math.ceil(n / partition)), pool=pictures)
    generation = time.perf_counter() - start
    try:
        child = subprocess.run([sys.executable, __file__, "--child", str(recipe),
                                str(work / f"{name}-planted.npz"), "--workers", str(workers)],
                               cwd=REPO, capture_output=True, text=True)
        if child.returncode:
            sys.exit(f"size {n} failed:\n{child.stderr[-5000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
    finally:  # disk is limited: only one size's corpus at a time
        shutil.rmtree(work / name, ignore_errors=True)
        for f in (recipe, work / f"{name}-planted.npz"):
            f.unlink(missing_ok=True)
    return {"n": n, "partitions": max(1, math.ceil(n / partition)), "generation": generation, **result}


def totals(r: dict, stage: str) -> dict:
    steps = r["steps"][stage].values()
    return {k: sum(s[k] for s in steps) for k in ("cpu", "read", "written")} | {"peak": max(s["peak"] for s in steps)}


def report(r: dict) -> None:
    n = r["n"]
    print(f"\nN = {n:,} pairs, {r['partitions']} partitions (generation {r['generation']:.0f} s, not counted); "
          f"corpus {r['corpus'] / MB:,.0f} MB ({r['corpus_raw'] / MB:,.0f} MB with the images at their own size); "
          f"kept {r['kept']:,}")
    print(f"{'stage':8} {'wall s':>8} {'cpu s':>8} {'samples/s/core':>15} {'read MB':>9} {'written MB':>11} "
          f"{'read/corpus':>12} {'task peak MB':>13} {'driver peak MB':>15}")
    rows = [(s, totals(r, s), r["wall"][s], r["driver_peak"][s]) for s in STAGES]
    total = {k: sum(t[k] for _, t, _, _ in rows) for k in ("cpu", "read", "written")}
    total["peak"] = max(t["peak"] for _, t, _, _ in rows)
    rows.append(("total", total, sum(r["wall"].values()), max(r["driver_peak"].values())))
    for name, t, wall, driver in rows:
        print(f"{name:8} {wall:8.1f} {t['cpu']:8.1f} {n / t['cpu']:15,.0f} {t['read'] / MB:9,.0f} "
              f"{t['written'] / MB:11,.0f} {t['read'] / r['corpus']:12.2f} {t['peak'] / MB:13,.0f} {driver / MB:15,.0f}")
    print(f"{'step':16} {'tasks':>5} {'cpu s':>8} {'us/sample':>10} {'read MB':>9} {'written MB':>11} {'peak MB':>8}")
    for stage in STAGES:
        for step, s in r["steps"][stage].items():
            print(f"{stage + ' ' + step:16} {s['tasks']:5} {s['cpu']:8.2f} {s['cpu'] / n * 1e6:10.1f} "
                  f"{s['read'] / MB:9,.0f} {s['written'] / MB:11,.0f} {s['peak'] / MB:8,.0f}")
    d = r["steps"]["dedup"]
    print(f"dedup bucket step: {d['bucket']['tasks']} tasks, {d['bucket']['cpu']:.2f} cpu s; the whole search "
          f"(map + bucket: reading the partitions, exact and near): {hashes_per_core(r):,.0f} images/s per core "
          f"(the near-duplicate search alone: bench/neardup.py)")
    print(f"recall N={n}: {r['recall']} ({r['pairs']:,} planted exact and near pairs); same-URL pairs "
          f"{r['url_recall']}; removed {r['removed']:,} for {r['planted']:,} planted copies")


def hashes_per_core(r: dict) -> float:
    d = r["steps"]["dedup"]
    return r["n"] / (d["map"]["cpu"] + d["bucket"]["cpu"])


def goals(results: list[dict]) -> None:
    small = results[0]
    print("\nGoals")
    for big in results[1:]:
        for stage in (*STAGES, "total"):
            per = [(sum(totals(r, s)["cpu"] for s in STAGES) if stage == "total" else totals(r, stage)["cpu"]) / r["n"]
                   for r in (small, big)]
            ratio = per[1] / per[0]
            print(f"  time per sample, {stage:8} N = {small['n']:,} -> {big['n']:,}: {per[0] * 1e6:5.1f} -> "
                  f"{per[1] * 1e6:5.1f} us, {ratio:.2f}x (goal <= 1.25x: {'met' if ratio <= 1.25 else 'NOT met'})")
    peak = max(max(max(totals(r, s)["peak"] for s in STAGES), max(r["driver_peak"].values())) for r in results)
    print(f"  max peak RSS, any task or driver: {peak / MB:,.0f} MB (goal <= 2048: {'met' if peak <= 2 << 30 else 'NOT met'})")
    for r in results:
        read = sum(totals(r, s)["read"] for s in STAGES)
        ratio = read / r["corpus"]
        print(f"  N = {r['n']:,}: bytes read / corpus {ratio:.2f}x (goal <= 3x: {'met' if ratio <= 3 else 'NOT met'}; "
              f"{read / r['corpus_raw']:.2f}x with the images at their own size); "
              f"dedup map + bucket {hashes_per_core(r):,.0f} images/s per core; recall {r['recall']}")


def extrapolate(r: dict, a: argparse.Namespace) -> None:
    """400M kept pairs out of 2B downloaded images on a cluster, from the largest size's figures."""
    cores = a.nodes * a.cores
    bandwidth = a.nodes * min(a.disk_gbs * 1e9, a.net_gbit * 1e9 / 8)
    image = a.image_kb * 1000
    print(f"\nExtrapolation from N = {r['n']:,}: {a.downloaded:,.0f} downloaded -> {a.kept:,.0f} kept, "
          f"{a.nodes} nodes x {a.cores} cores. Assumptions:")
    print(f"  - CPU seconds per sample stay as measured here (dedup and balance per downloaded image, shards per "
          f"kept sample); tasks scale out perfectly over {cores} cores; the one-task steps (dedup group and "
          f"reduce, shards reduce) run on one core and grow linearly with the corpus;")
    print(f"  - every byte read or written crosses a node's network link to shared storage and that storage's disks: "
          f"{a.disk_gbs} GB/s of disk and {a.net_gbit} Gbit/s of network per node, the smaller counts;")
    print(f"  - images are {a.image_kb} KB (256 px JPEG) instead of the synthetic {r['kept_bytes'] / r['kept'] / 1000:.1f} KB; "
          f"the shards scatter reads every downloaded image (kept or not) and the kept image bytes are written to "
          f"buckets, read back and written as tars; other bytes per sample stay as measured; CPU per sample does "
          f"not grow with image size;")
    print("  - a stage takes the longer of its CPU-bound and I/O-bound time; stages run one after another.")
    print(f"{'stage':8} {'samples':>8} {'core h':>8} {'CPU-bound h':>12} {'TB moved':>9} {'I/O-bound h':>12} {'estimate h':>11}")
    total = 0.0
    for stage in STAGES:
        steps = r["steps"][stage]
        measured, real = (r["kept"], a.kept) if stage == "shards" else (r["n"], a.downloaded)
        serial = sum(s["cpu"] for k, s in steps.items() if k not in ("map", "bucket", "decide"))
        parallel = sum(s["cpu"] for s in steps.values()) - serial
        cpu_h = (parallel / measured * real / cores + serial / measured * real) / 3600
        moved = sum(s["read"] + s["written"] for s in steps.values())
        if stage == "shards":  # image bytes as modelled above; the rest per kept sample as measured
            other = max(0, moved - r["image_files"] - 3 * r["kept_bytes"])
            moved_real = other / measured * real + a.downloaded * image + 3 * a.kept * image
        else:
            moved_real = moved / measured * real
        io_h = moved_real / bandwidth / 3600
        total += max(cpu_h, io_h)
        print(f"{stage:8} {real / 1e6:7,.0f}M {(parallel + serial) / measured * real / 3600:8,.0f} {cpu_h:12.2f} "
              f"{moved_real / 1e12:9.1f} {io_h:12.2f} {max(cpu_h, io_h):11.2f}")
    print(f"total: about {total:.1f} hours")


def extrapolate_layout(small: dict, big: dict, a: argparse.Namespace) -> None:
    """What does not show in time per sample: the one-task steps' memory, and the shuffles' file counts."""
    from pipelines.dedup.stage import RECORDS_PER_BUCKET
    from pipelines.shard import CHUNK_BYTES, shard_layout

    # A task's peak includes what its worker process kept from earlier tasks, so a step whose peak
    # less than doubles between the sizes is taken as flat, not extrapolated from that noise.
    print("One-task steps' peak memory (linear in the corpus where it grows):")
    for stage in STAGES:
        (m0, m1), real = ((small["kept"], big["kept"]), a.kept) if stage == "shards" else ((small["n"], big["n"]), a.downloaded)
        for step, s in big["steps"][stage].items():
            if step in ("map", "bucket", "decide") or m1 <= m0:
                continue
            before = small["steps"][stage][step]["peak"]
            grown = s["peak"] + (s["peak"] - before) / (m1 - m0) * (real - m1)
            at_scale = f"{grown / 2**30:,.0f} GB at {real / 1e6:,.0f}M" if s["peak"] > 2 * before else "flat"
            print(f"  {stage} {step}: {before / MB:,.0f} MB at {m0:,}, {s['peak'] / MB:,.0f} MB at {m1:,}: {at_scale}")
    maps = math.ceil(a.downloaded / a.partition)
    dedup_buckets = math.ceil(a.downloaded * 5 / RECORDS_PER_BUCKET)  # radius 4: 5 band records per image
    buckets, _ = shard_layout(int(a.kept), int(a.kept * a.image_kb * 1000), 10_000, 1 << 30)
    # Every map task writes a data file and an index per kind; a bucket task reads one byte range per
    # map task (per chunk, in shards, whose scatter holds a chunk of samples at a time).
    chunk = min(CHUNK_BYTES / (a.image_kb * 1000), a.kept / maps)
    chunks = maps * math.ceil(a.kept / maps / chunk)
    ranges = chunks * buckets * (1 - math.exp(-chunk / buckets))
    print(f"Shuffles at that size, partitions of {a.partition:,}: dedup {maps:,} map tasks x {dedup_buckets:,} buckets: "
          f"{4 * maps:,} files, {2 * maps * dedup_buckets / 1e6:,.0f}M byte ranges read of "
          f"{a.downloaded * 7 / (2 * maps * dedup_buckets):,.0f} records each; shards {maps:,} map tasks x {buckets:,} "
          f"buckets: {2 * maps:,} files, {chunks:,} scatter chunks of {chunk:,.0f} samples, about {ranges / 1e6:,.0f}M "
          f"byte ranges read of {a.kept / ranges:.1f} samples each")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--partition", type=int, default=250_000, help="pairs per partition")
    ap.add_argument("--work", type=Path, default=Path("/tmp/wit-scale"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="sizes 5,000 and 20,000, partitions of 2,500")
    ap.add_argument("--child", nargs=2, metavar=("RECIPE", "PLANTED"), help=argparse.SUPPRESS)
    # The extrapolation's cluster and corpus.
    ap.add_argument("--downloaded", type=float, default=2e9)
    ap.add_argument("--kept", type=float, default=4e8)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--cores", type=int, default=32)
    ap.add_argument("--image-kb", type=float, default=20)
    ap.add_argument("--disk-gbs", type=float, default=2.0, help="GB/s of disk per node")
    ap.add_argument("--net-gbit", type=float, default=25, help="Gbit/s of network per node")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(*a.child, a.workers)))
        return
    if a.smoke:
        a.sizes, a.partition = [5_000, 20_000], 2_500
    a.work.mkdir(parents=True, exist_ok=True)
    # Figures belong to one version of the stage code: say which.
    code = hashlib.sha256(b"".join((REPO / f).read_bytes() for f in CODE)).hexdigest()[:12]
    print(f"dedup -> balance -> shards, {a.workers} workers, partitions of {a.partition:,} pairs; stage code {code}")
    results = []
    for n in a.sizes:
        results.append(run_size(n, a.partition, a.work, a.workers, 4096 if a.smoke else PICTURES))
        report(results[-1])
    goals(results)
    extrapolate(results[-1], a)
    extrapolate_layout(results[0], results[-1], a)


if __name__ == "__main__":
    main()
