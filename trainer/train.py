"""Contrastive pretraining of open_clip models on WebDataset shards, from one CPU to many GPUs.

    wit train --data runs/demo/shards --model wit-tiny --steps 200 --output runs/train-demo
    torchrun --nproc-per-node 8 -m trainer.train --data 'shards/{000000..000999}.tar' --model ViT-B-32 ...

The recipe is CLIP's: symmetric InfoNCE over the global batch (features are all-gathered with their
gradients, so every rank contrasts against every sample), a learnable temperature initialised at
0.07 with the logit scale clamped at 100, AdamW with decoupled weight decay on weight matrices only,
cosine schedule with linear warm-up, gradient clipping, bf16 autocast on GPU.

A run lives in its --output folder: checkpoints/ (every --save-every steps, atomic), log.csv (loss,
lr, temperature, samples/s, data-wait share, skipped samples), eval.csv and args.json. Running the
same command again resumes from the newest checkpoint, mid-epoch: model, optimiser, schedule, scaler
and step are restored, and the data stream restarts from a seed derived from the step, so the resumed
run sees fresh samples instead of replaying the first ones.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from tqdm import tqdm
from webdataset.utils import make_seed

from wit_builder.errors import WitError
from wit_builder.workspace import atomic_path, atomic_write_bytes

from . import data, models, zeroshot
from .checkpoints import Checkpoints, check_batch_size, load_checkpoint
from .progress import Progress

log = logging.getLogger("wit.train")

LOG_FIELDS = ["step", "samples", "loss", "lr", "logit_scale", "temperature", "samples_per_s",
              "data_wait", "skipped"]
EVAL_FIELDS = ["step", "top1", "top5", "images"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and every option's default after its help (argparse's
    ArgumentDefaultsHelpFormatter, less the noise: no 'None' for options without a default, no
    'False' for flags, and lists as they are typed). argparse prints nothing for an option without
    help text, so every option has some."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is argparse.SUPPRESS
                or action.required or action.nargs == 0 or not action.option_strings):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {default})".lstrip().replace("%", "%%")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wit train", description=__doc__, formatter_class=HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", action="append", required=True,
                   help="shards: a path, brace pattern, glob, folder of .tar, pipe: or URL; "
                        "repeat (or join with ::) to mix sources")
    d.add_argument("--data-weights", type=float, nargs="+", help="one sampling weight per source")
    d.add_argument("--no-resampled", dest="resampled", action="store_false",
                   help="loop over each worker's share of shards instead of drawing with replacement")
    d.add_argument("--shuffle-buffer", type=int, default=2000, help="samples in the shuffle buffer")
    d.add_argument("--crop-scale", type=float, nargs=2, default=(0.9, 1.0),
                   help="area range of the random square crop, relative to the largest square")
    d.add_argument("--workers", type=int, default=2, help="data loader processes per rank")
    m = p.add_argument_group("model and optimisation")
    m.add_argument("--model", default="wit-tiny", help="an open_clip architecture, or wit-tiny")
    m.add_argument("--init", help="start from this checkpoint's weights (local file)")
    m.add_argument("--steps", type=int, required=True, help="optimiser steps in all")
    m.add_argument("--batch-size", type=int, default=256, help="per rank")
    m.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    m.add_argument("--wd", type=float, default=0.2, help="AdamW weight decay, on weight matrices only")
    m.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    m.add_argument("--beta2", type=float, default=0.98, help="AdamW beta2")
    m.add_argument("--eps", type=float, default=1e-6, help="AdamW epsilon")
    m.add_argument("--warmup", type=int, default=100,
                   help="linear warm-up steps; warns when not fewer than --steps")
    m.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 turns it off")
    m.add_argument("--precision", choices=["auto", "fp32", "amp_bf16", "amp"], default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU; amp is fp16 with a grad scaler")
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda")
    m.add_argument("--seed", type=int, default=0, help="seeds the weights and the data stream")
    r = p.add_argument_group("run folder")
    r.add_argument("--output", required=True, help="run folder: checkpoints, log.csv, eval.csv")
    r.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps")
    r.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    r.add_argument("--resume", default="auto",
                   help="auto (newest checkpoint in --output, if any), none, or a checkpoint path; "
                        "a resumed run needs the checkpoint's --model and --batch-size")
    r.add_argument("--log-every", type=int, default=10, help="log.csv row every N steps")
    e = p.add_argument_group("zero-shot evaluation during training")
    e.add_argument("--eval-data", help="image folder or shards with a class field")
    e.add_argument("--eval-classnames", help="file, one class name per line (for an image folder, "
                                             "matched to the sub-folders by name)")
    e.add_argument("--eval-templates", help="file, one template per line with {} (default: 80 ImageNet)")
    e.add_argument("--eval-class-key", default="cls", help="the shards' class field (.cls or in .json)")
    e.add_argument("--eval-every", type=int, default=0,
                   help="steps between evaluations; 0: at the end only")
    return p


def cosine_with_warmup(warmup: int, steps: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device(device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        return self.sum(value) / self.world

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class CsvLog:
    """An append-only CSV that a resumed run first cuts back to the checkpoint's step."""

    def __init__(self, path: Path, fields: list[str], resume_step: int):
        self.path, self.fields = path, fields
        rows = []
        if path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)


def autocast_for(precision: str, device: torch.device):
    if precision == "amp_bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "amp":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def parallel(model: torch.nn.Module, env: Distributed, compile: bool = False):
    """Wrap the model for the run (torch.compile, DDP) and give the loss that matches it: each
    rank's features are all-gathered with their gradients, so every rank contrasts its samples
    against the global batch and the gradients equal those of one process on that batch."""
    if compile:
        model = torch.compile(model)
    if env.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    # open_clip gathers with torch.distributed.nn.all_gather, which torch now calls deprecated.
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                       rank=env.rank, world_size=env.world)
    return model, loss_fn


def contrastive_loss(model, loss_fn: ClipLoss, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: cross-entropy over image->text and text->image cosine logits."""
    output = model(images, texts)
    return loss_fn(output["image_features"], output["text_features"], output["logit_scale"])


def check(args) -> None:
    for name in ("steps", "batch_size", "save_every", "log_every", "keep"):
        if getattr(args, name) < 1:
            raise WitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise WitError(f"--crop-scale must satisfy 0 < low <= high <= 1, got {args.crop_scale}")
    if args.warmup < 0 or args.lr <= 0 or args.wd < 0 or args.workers < 0:
        raise WitError("--warmup, --wd and --workers must be >= 0 and --lr > 0")
    if args.warmup >= args.steps and int(os.environ.get("RANK", 0)) == 0:
        log.warning("--warmup %d is not fewer than --steps %d: the learning rate never reaches --lr "
                    "%g and the cosine decay never starts", args.warmup, args.steps, args.lr)


def train(args) -> dict:
    """Run (or resume) training; return the final step's figures."""
    check(args)
    sources = data.sources(args.data, args.data_weights)
    env = Distributed(args.device)
    out = Path(args.output)
    precision = args.precision
    if precision == "auto":
        precision = "amp_bf16" if env.device.type == "cuda" else "fp32"

    torch.manual_seed(args.seed)
    model, tokenizer, image_size, mean, std = models.create(args.model, args.init, env.device)
    normalise = models.Normalise(mean, std).to(env.device)
    optimizer = torch.optim.AdamW(models.param_groups(model, args.wd), lr=args.lr,
                                  betas=(args.beta1, args.beta2), eps=args.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(args.warmup, args.steps))
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "amp")
    checkpoints = Checkpoints(out, args.keep)

    step = samples = skipped = 0
    resume = None if args.resume == "none" else (
        checkpoints.latest() if args.resume == "auto" else Path(args.resume))
    if resume is not None:
        state = load_checkpoint(resume)
        if state["model"] != args.model:
            raise WitError(f"checkpoint is of {state['model']}, not --model {args.model}", where=str(resume))
        check_batch_size(state, args.batch_size, resume)
        models.load_state(model, state["state_dict"], str(resume))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, samples, skipped = state["step"], state["samples"], state["skipped"]
        if env.main:
            log.info("resumed from %s at step %d", resume, step)
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "args.json", json.dumps(vars(args), indent=1, default=str).encode())
        train_log = CsvLog(out / "log.csv", LOG_FIELDS, step)
        eval_log = CsvLog(out / "eval.csv", EVAL_FIELDS, step)
    if step >= args.steps:
        if env.main:
            log.info("already trained to step %d of %d in %s", step, args.steps, out)
        return {"step": step}

    raw_model = model
    model, loss_fn = parallel(model, env, args.compile)
    autocast = autocast_for(precision, env.device)

    # The stream's seed depends on the step it starts at: a resumed run draws new samples.
    stream = data.ShardStream(sources, tokenizer, image_size, args.batch_size,
                              seed=make_seed(args.seed, step), resampled=args.resampled,
                              shuffle_buffer=args.shuffle_buffer, scale=tuple(args.crop_scale))
    batches = iter(data.loader(stream, args.workers, pin_memory=env.device.type == "cuda"))

    evaluation = ZeroShotProbe(args, image_size) if args.eval_data and env.main else None
    bar = Progress(args.steps, "train", "step", initial=step, disable=not env.main, emit=log.info)
    window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
    row = {}
    model.train()
    while step < args.steps:
        t0 = time.perf_counter()
        batch = next(batches)
        window_wait += time.perf_counter() - t0
        images = normalise(batch["images"].to(env.device, non_blocking=True))
        texts = batch["texts"].to(env.device, non_blocking=True)
        skipped += batch["skipped"]

        with autocast:
            loss = contrastive_loss(model, loss_fn, images, texts)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        with torch.no_grad():
            raw_model.logit_scale.clamp_(0, models.MAX_LOGIT_SCALE)
        step += 1
        samples += args.batch_size * env.world
        window_steps += 1

        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - window_start
            scale = raw_model.logit_scale.exp().item()
            row = {"step": step, "samples": samples, "loss": round(env.mean(loss.item()), 6),
                   "lr": optimizer.param_groups[0]["lr"], "logit_scale": round(scale, 4),
                   "temperature": round(1 / scale, 6),
                   "samples_per_s": round(window_steps * args.batch_size * env.world / elapsed, 1),
                   "data_wait": round(env.mean(window_wait / elapsed), 4),
                   "skipped": int(env.sum(skipped))}
            if env.main:
                train_log.write(row)
                bar.set_postfix(loss=row["loss"], T=row["temperature"], sps=row["samples_per_s"],
                                wait=f"{row['data_wait']:.0%}")
            window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
        bar.update(1)

        if step % args.save_every == 0 or step == args.steps:
            if env.main:
                checkpoints.save({
                    "model": args.model, "batch_size": args.batch_size, "step": step,
                    "samples": samples, "skipped": skipped,
                    "state_dict": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "args": vars(args)}, step)
            env.barrier()
        if evaluation and ((args.eval_every and step % args.eval_every == 0) or step == args.steps):
            result = evaluation.run(raw_model, tokenizer, mean, std, env.device, autocast)
            eval_log.write({"step": step, **result})
            tqdm.write(f"step {step}: zero-shot top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%} "
                       f"on {result['images']} images")
            row.update({f"eval_{k}": v for k, v in result.items()})
    bar.close()
    del batches
    return row


class ZeroShotProbe:
    """The zero-shot evaluation during training: the --eval-data set with its class names and
    templates, read once."""

    def __init__(self, args, image_size: int):
        self.dataset, self.classnames = zeroshot.labelled_set(
            args.eval_data, image_size, 256, args.eval_class_key, args.eval_classnames)
        if not self.classnames:
            raise WitError("no class names: pass --eval-classnames, or put classnames.txt beside the "
                           "shards", where=args.eval_data)
        self.templates = zeroshot.read_templates(args.eval_templates)
        self.workers = min(args.workers, 2)

    def run(self, model, tokenizer, mean, std, device, autocast) -> dict:
        return zeroshot.evaluate(model, tokenizer, self.dataset, self.classnames, self.templates,
                                 mean, std, device, self.workers, autocast)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        row = train(args)
    except WitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if row and int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(row))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
