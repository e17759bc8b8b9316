"""Training throughput: wit train against open_clip_train on the same shards, model, batch size,
precision and loader workers, in the same run. Reports samples/s and the share of each step spent
waiting for data, from each trainer's own log, after its first logging window (warm-up, compile).

On a GPU (the figures in bench/README.md): ViT-B-32 and ViT-B-16 at batch 256, bf16:
    .venv/bin/python bench/train_throughput.py --models ViT-B-32 ViT-B-16 --batch 256 --steps 120 --workers 8
On a CPU it runs the tiny model (the default), which is what CI-sized machines can do:
    .venv/bin/python bench/train_throughput.py
--smoke: wit-tiny, 64 samples, batch 8, 3 steps, no loader workers (the test suite's check that both
trainers still run here; its figures are start-up, not throughput).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from train_data import make_shards

# open_clip_train only knows the configs registered in its own process, and its sample grouper
# predates the end-of-shard markers webdataset 0.2.1xx yields: turn them off for it.
OPEN_CLIP_TRAIN = ("import sys, functools, open_clip, open_clip_train.data as d; "
                   "open_clip.add_model_config({configs!r}); "
                   "d.tar_file_expander = functools.partial(d.tar_file_expander, eof_value=None); "
                   "from open_clip_train.main import main; main(sys.argv[1:])")


def run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def wit(shards: str, model: str, args, out: Path) -> tuple[float, float]:
    run([sys.executable, "-m", "trainer.train", "--data", shards, "--model", model, "--steps", str(args.steps),
         "--batch-size", str(args.batch), "--workers", str(args.workers), "--output", str(out),
         "--log-every", str(args.log_every), "--save-every", str(10 ** 9), "--warmup", "10",
         "--precision", args.precision, "--resume", "none"], out.with_suffix(".log"))
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    rows = rows[1:-1] or rows[-1:]
    return (sum(float(r["samples_per_s"]) for r in rows) / len(rows),
            sum(float(r["data_wait"]) for r in rows) / len(rows))


def open_clip_train(shards: str, model: str, args, out: Path) -> tuple[float, float]:
    log = out.with_suffix(".open_clip.log")
    run([sys.executable, "-c", OPEN_CLIP_TRAIN.format(configs=str(REPO / "trainer" / "model_configs")),
         "--train-data", shards, "--dataset-type", "webdataset", "--dataset-resampled",
         "--train-num-samples", str(args.steps * args.batch), "--epochs", "1", "--model", model,
         "--batch-size", str(args.batch), "--workers", str(args.workers), "--warmup", "10",
         "--precision", "fp32" if args.precision == "fp32" else "amp_bf16", "--save-frequency", "0",
         "--log-every-n-steps", str(args.log_every), "--logs", str(out), "--name", "bench",
         "--report-to", "", "--local-loss", "--gather-with-grad", "--grad-clip-norm", "1.0", "--seed", "0"], log)
    # "Data (t): 0.012 Batch (t): 0.345, 742.1/s ..." (averages over the logging window)
    windows = [(float(d), float(b)) for d, b in re.findall(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)",
                                                           log.read_text())]
    windows = windows[1:-1] or windows[-1:]
    if not windows:
        sys.exit(f"no throughput lines in {log}")
    return (sum(args.batch / b for _, b in windows) / len(windows),
            sum(d / b for d, b in windows) / len(windows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["wit-tiny"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--samples", type=int, default=4000, help="samples written to the bench shards")
    p.add_argument("--precision", default="auto", help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--smoke", action="store_true",
                   help="--models wit-tiny --samples 64 --batch 8 --steps 3 --log-every 1 --workers 0")
    args = p.parse_args()
    if args.smoke:
        args.models, args.samples, args.batch, args.steps, args.log_every, args.workers = \
            ["wit-tiny"], 64, 8, 3, 1, 0
    import torch
    if args.precision == "auto":
        args.precision = "amp_bf16" if torch.cuda.is_available() else "fp32"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        urls = make_shards(tmp, args.samples, 256)
        shards = str(tmp / f"{{000000..{len(urls) - 1:06d}}}.tar")
        print(f"{device}; {args.samples} 256-px samples; batch {args.batch}, {args.steps} steps, "
              f"{args.workers} loader workers, {args.precision}")
        ratios = []
        for i, model in enumerate(args.models):
            ours, ours_wait = wit(shards, model, args, tmp / f"wit-{i}-{model}")
            theirs, their_wait = open_clip_train(shards, model, args, tmp / f"oc-{i}-{model}")
            print(f"{model:10s} wit {ours:9.1f} samples/s (data wait {ours_wait:5.1%})   "
                  f"open_clip_train {theirs:9.1f} samples/s (data wait {their_wait:5.1%})   "
                  f"ratio {ours / theirs:.2f}x")
            ratios.append(f"{ours / theirs:.2f}x open_clip_train ({model})")
    print(f"ratio: {', '.join(ratios)}")


if __name__ == "__main__":
    main()
