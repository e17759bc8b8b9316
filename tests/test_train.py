"""The trainer: shard streaming, the CLIP loss across processes, checkpoint resume, zero-shot eval."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, needs_fashion, wit
from PIL import Image

from trainer import data, fashion, models, train, zeroshot
from wit_builder.errors import WitError
from wit_builder.tar import write_shard

pytestmark = needs_fashion


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """3,000 Fashion-MNIST training and 3,000 test samples, 500 to a shard."""
    out = tmp_path_factory.mktemp("fashion-small")
    fashion.build(out, per_shard=500, limit=3000)
    return out


@pytest.fixture(scope="module")
def tiny():
    return models.create("wit-tiny")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo() -> np.ndarray:
    from skimage import data as skdata
    return skdata.astronaut()  # 512 x 512 RGB


# --- sources and streaming -------------------------------------------------------------------------

def test_sources_expand_patterns_globs_folders_and_mixes(small_shards):
    by_brace = data.expand(str(small_shards / "train-{000000..000002}.tar"))
    assert [Path(u).name for u in by_brace] == [f"train-00000{i}.tar" for i in range(3)]
    assert len(data.expand(str(small_shards / "test-*.tar"))) == 6
    assert len(data.expand(str(small_shards))) == 12  # a folder: every .tar in it
    mixed = data.sources([f"{small_shards}/train-000000.tar::{small_shards}/test-*.tar"], [1, 3])
    assert [len(s.urls) for s in mixed] == [1, 6] and [s.weight for s in mixed] == [1, 3]
    assert data.expand("pipe:cat a.tar") == ["pipe:cat a.tar"]
    with pytest.raises(WitError, match="missing-000000.tar"):
        data.expand(str(small_shards / "missing-{000000..000001}.tar"))
    with pytest.raises(WitError, match="2 weights for 1"):
        data.sources([str(small_shards)], [1, 2])


def test_weighted_sources_are_drawn_in_proportion(small_shards):
    sources = data.sources([str(small_shards / "train-*.tar"), str(small_shards / "test-*.tar")], [3, 1])
    stream = data.ShardStream(sources, None, 32, 8)
    draws = stream.shard_urls(random.Random(0), 0, 1)
    share = sum("train-" in next(draws) for _ in range(8000)) / 8000
    assert abs(share - 0.75) < 0.02


def labels_read(stream: data.ShardStream) -> list[int]:
    return [int(x) for batch in stream for x in batch["labels"]]


def test_pipe_and_fsspec_urls_read_like_local_paths(small_shards):
    path = small_shards / "test-000000.tar"
    expected = labels_read(data.ShardStream(data.sources([str(path)]), None, 32, 64, labels="cls"))
    assert len(expected) == 500
    for url in (f"pipe:cat {path}", f"file://{path}"):
        stream = data.ShardStream([data.Source([url])], None, 32, 64, labels="cls")
        assert labels_read(stream) == expected


def test_fewer_shards_than_workers_still_feeds_every_worker(small_shards, monkeypatch):
    """2 shards, 2 ranks x 3 workers: every slot gets samples, each sample read exactly once."""
    two = data.sources([str(small_shards / "test-00000[01].tar")])
    seen = []
    for rank in range(2):
        for worker in range(3):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "3")
            mine = labels_read(data.ShardStream(two, None, 32, 50, labels="cls"))
            assert 160 <= len(mine) <= 170, (rank, worker, len(mine))
            seen.append(mine)
    monkeypatch.undo()
    whole = labels_read(data.ShardStream(two, None, 32, 50, labels="cls"))
    assert sorted(x for part in seen for x in part) == sorted(whole) and len(whole) == 1000


def test_a_real_dataloader_with_more_workers_than_shards(small_shards, tiny):
    _, tokenizer, size, _, _ = tiny
    one = data.sources([str(small_shards / "train-000000.tar")])
    stream = data.ShardStream(one, tokenizer, size, 100, seed=1, resampled=False)
    batches = data.loader(stream, workers=2)
    got = [b for _, b in zip(range(12), batches)]
    assert all(b["images"].shape == (100, size, size, 3) and b["texts"].shape == (100, 24) for b in got)
    assert all(b["skipped"] == 0 for b in got)


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    return bytes(raw)


def test_broken_samples_are_skipped_and_counted(tmp_path, tiny):
    """Garbage bytes, a truncated JPEG, a PNG claiming 60000x60000 pixels, no caption, a non-UTF-8
    caption and a shard cut inside a member: every good sample arrives, every bad one is counted,
    and none stalls the stream."""
    _, tokenizer, size, _, _ = tiny
    good = jpeg(photo()[::4, ::4])
    samples = []
    for i, (key, image) in enumerate([("garbage", b"not an image at all"),
                                      ("truncated", good[: len(good) // 3]),
                                      ("bomb", png_claiming(60000, 60000))]):
        samples.append((f"good{i}", good, f"good sample {i}", b"{}"))
        samples.append((key, image, "a caption", b"{}"))
    write_shard(str(tmp_path / "a.tar"), samples, "jpg")
    # Members the corpus writer never produces: an image with no caption, a caption in Latin-1.
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        for name, payload in [("nocap.jpg", good), ("latin1.jpg", good), ("latin1.txt", b"caf\xe9"),
                              ("good3.jpg", good), ("good3.txt", b"good sample 3")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    # good0 whole, then the file ends inside the next member's data.
    first = 512 + len(good) + (-len(good) % 512) + 2 * 1024
    (tmp_path / "c.tar").write_bytes((tmp_path / "a.tar").read_bytes()[: first + 512 + 5])
    shards = data.sources([str(tmp_path / n) for n in ("a.tar", "b.tar", "c.tar")])
    stream = data.ShardStream(shards, tokenizer, size, 1, resampled=False, shuffle_buffer=0)
    start = time.perf_counter()
    batches = iter(data.loader(stream, 0))
    got = [next(batches) for _ in range(10)]  # two passes of 5 good samples
    assert time.perf_counter() - start < 30
    assert all(b["images"].shape == (1, size, size, 3) for b in got)
    texts = {tuple(b["texts"][0].tolist()) for b in got}
    wanted = ["good sample 0", "good sample 1", "good sample 2", "good sample 3"]
    assert texts == {tuple(t) for t in tokenizer(wanted).tolist()}
    # Each pass has 6 bad records (3 in a.tar, 2 in b.tar, the cut in c.tar); the counts a batch
    # carries cover the first pass whole.
    assert 6 <= sum(b["skipped"] for b in got) <= 12


def test_a_stream_with_nothing_readable_stops_with_an_error(tmp_path, tiny):
    _, tokenizer, size, _, _ = tiny
    write_shard(str(tmp_path / "bad.tar"), [(f"k{i}", b"junk", "text", b"{}") for i in range(50)], "jpg")
    (tmp_path / "empty.tar").write_bytes(b"\0" * 1024)
    for name in ("bad.tar", "empty.tar"):
        stream = data.ShardStream(data.sources([str(tmp_path / name)]), tokenizer, size, 8)
        with pytest.raises(WitError, match=name):
            next(iter(stream))


def test_crops_decode_in_draft_mode_close_to_a_full_decode():
    """The centre crop through draft decoding matches a full decode, crop and resize, and random
    crops are random but repeatable from a seed."""
    image = photo()
    encoded = jpeg(image)
    fast = data.load_image(encoded, 64, None).astype(float)
    full = Image.open(io.BytesIO(encoded)).convert("RGB").resize((64, 64), Image.BICUBIC)
    assert fast.shape == (64, 64, 3)
    assert np.abs(fast - np.asarray(full, float)).mean() < 4  # of 255
    a = data.load_image(encoded, 64, random.Random(1))
    b = data.load_image(encoded, 64, random.Random(1))
    c = data.load_image(encoded, 64, random.Random(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    x, y, side = data.square_crop(640, 480, random.Random(0), (0.9, 1.0))
    assert 480 * math.sqrt(0.9) <= side <= 480 and 0 <= x <= 640 - side and 0 <= y <= 480 - side
    gray = data.load_image(fashion.png(np.full((28, 28), 200, np.uint8)), 32, None)
    assert gray.shape == (32, 32, 3) and abs(int(gray[16, 16, 0]) - 200) <= 2


# --- optimisation -----------------------------------------------------------------------------------

def test_weight_decay_only_on_weight_matrices(tiny):
    model = tiny[0]
    decay, no_decay = models.param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0
    assert {"logit_scale", "visual.ln_post.weight", "visual.ln_post.bias",
            "transformer.resblocks.0.attn.in_proj_bias"} <= exempt
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "token_embedding.weight" not in exempt
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_temperature_starts_at_007(tiny):
    assert tiny[0].logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_cosine_schedule_with_warmup():
    f = train.cosine_with_warmup(10, 110)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def torchrun_step(out: Path, nproc: int, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(29500 + os.getpid() % 1000), str(REPO / "tests" / "ddp_step.py"),
           str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def test_two_process_gather_equals_one_process_on_the_global_batch(tmp_path):
    """2 processes over gloo, 8 samples each, against 1 process with all 16: the same loss and
    the same gradients on every parameter. Without the gather each rank sees a 8x8 problem and
    both differ."""
    single = torchrun_step(tmp_path / "single.pt", 1)
    ddp = torchrun_step(tmp_path / "ddp.pt", 2)
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    for name, grad in single["grads"].items():
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    apart = torchrun_step(tmp_path / "apart.pt", 2, "--no-gather")
    assert abs(apart["loss"] - single["loss"]) > 0.1


# --- runs: resume, bad input -----------------------------------------------------------------------

def train_cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "wit_builder.cli", "train", "--data", str(shards / "train-*.tar"),
            "--output", str(out), "--batch-size", "64", "--workers", "0", "--log-every", "1",
            "--warmup", "5", "--lr", "2e-3", "--shuffle-buffer", "200", *extra]


def test_killed_run_resumes_mid_stream_and_the_curve_carries_on(small_shards, tmp_path):
    out = tmp_path / "run"
    cmd = train_cmd(small_shards, out, "--steps", "40", "--save-every", "20")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_00000020.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint at step 20"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(r["step"]) for r in read_csv(out / "log.csv"))
    assert killed_at < 40

    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = int(re.search(r"resumed from \S+step_(\d+)\.pt at step (\d+)", resumed.stderr).group(2))
    assert start == 20 <= killed_at

    rows = read_csv(out / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 41))  # no gap, no repeat, no restart
    assert all(int(r["samples"]) == 64 * int(r["step"]) for r in rows)
    schedule = train.cosine_with_warmup(5, 40)
    assert all(float(r["lr"]) == pytest.approx(2e-3 * schedule(int(r["step"])), abs=1e-9) for r in rows)
    loss = [float(r["loss"]) for r in rows]
    before, after = np.mean(loss[15:20]), np.mean(loss[20:25])
    # A restart from scratch would put the loss back where step 1 had it.
    assert after < np.mean(loss[:5]) - 0.25 and abs(after - before) < 0.25, loss
    final = torch.load(out / "checkpoints" / "step_00000040.pt", weights_only=False)
    assert final["step"] == 40
    assert all(int(s["step"]) == 40 for s in final["optimizer"]["state"].values())  # Adam's own count

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already trained to step 40" in again.stderr


def test_progress_into_a_file_is_plain_lines(small_shards, tmp_path):
    """With stderr in a log file, wit train and wit eval write a line every WIT_PROGRESS_SECONDS
    instead of tqdm's carriage-return updates."""
    env = {**os.environ, "WIT_PROGRESS_SECONDS": "0"}
    out = tmp_path / "run"
    commands = {"train": train_cmd(small_shards, out, "--steps", "3"),
                "eval": [sys.executable, "-m", "wit_builder.cli", "eval", "--data",
                         str(small_shards / "test-000000.tar"), "--checkpoint", str(out), "--workers", "0"]}
    logged = {}
    for name, cmd in commands.items():
        with open(tmp_path / f"{name}.log", "wb") as log:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, timeout=300)
        logged[name] = (tmp_path / f"{name}.log").read_bytes().decode()  # bytes: read_text turns \r into \n
        assert proc.returncode == 0, logged[name][-3000:]
        assert "\r" not in logged[name], logged[name][-3000:]
    steps = re.findall(r"train: step (\d) of 3 \(\d+%\), [\d.]+ steps/s, ETA \S+; loss [\d.]+", logged["train"])
    assert steps == ["1", "2", "3"], logged["train"]
    batches = re.findall(r"zero-shot: batch (\d), [\d.]+ batches/s", logged["eval"])
    assert batches == ["1", "2"], logged["eval"]  # 500 images, 256 to a batch


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(small_shards, tmp_path):
    """--compile (torch.compile, inductor on the CPU) gives the eager run's losses on the same seed
    and data, and its checkpoint loads into a plain model."""
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        proc = subprocess.run(train_cmd(small_shards, tmp_path / name, "--steps", "3", *extra), cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[name] = [float(r["loss"]) for r in read_csv(tmp_path / name / "log.csv")]
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=2e-3)
    model = models.create("wit-tiny")[0]
    models.load_weights(model, str(tmp_path / "compiled" / "checkpoints" / "step_00000003.pt"))


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "5", "--crop-scale", "1.0", "0.5"], "--crop-scale"),
    (["--steps", "5", "--data", "/nonexistent/shard-{000000..000003}.tar"], "/nonexistent/shard-000000.tar"),
    (["--steps", "5", "--model", "ViT-Nonexistent"], "unknown model 'ViT-Nonexistent'"),
    (["--steps", "5", "--data-weights", "1", "2"], "2 weights for 1"),
])
def test_bad_arguments_are_clear_errors(small_shards, tmp_path, args, message, capsys):
    assert train.main(train_cmd(small_shards, tmp_path / "bad", *args)[4:]) == 2
    assert message in capsys.readouterr().err


def test_bad_checkpoints_and_templates_are_named(small_shards, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x80\x02 not a checkpoint")
    proc = wit("eval", "--data", small_shards / "test-000000.tar", "--checkpoint", broken, check=False)
    assert proc.returncode == 2 and str(broken) in proc.stderr
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na photo without a slot.\n")
    with pytest.raises(WitError, match=r"templates.txt \(line 2\)"):
        zeroshot.read_templates(templates)


# --- the Fashion-MNIST sanity run --------------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory) -> tuple[Path, Path, float]:
    """Train the tiny model on the CPU from the whole Fashion-MNIST train split."""
    root = tmp_path_factory.mktemp("fashion")
    fashion.build(root / "shards")
    out = root / "run"
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "wit_builder.cli", "train", "--data", str(root / "shards" / "train-*.tar"),
           "--output", str(out), "--steps", "150", "--batch-size", "256", "--warmup", "20", "--lr", "1e-3",
           "--workers", "1", "--save-every", "150", "--log-every", "10",
           "--eval-data", str(root / "shards" / "test-*.tar")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out, time.perf_counter() - start


@pytest.mark.slow
def test_fashion_mnist_zero_shot_far_above_chance(fashion_run):
    root, out, seconds = fashion_run
    proc = wit("eval", "--data", root / "shards" / "test-*.tar", "--checkpoint", out, "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nFashion-MNIST zero-shot after {seconds:.0f} s of CPU training: {result}")
    assert result["images"] == 10000
    assert result["top1"] > 0.5  # chance is 0.1
    assert result["top5"] > result["top1"]
    during = read_csv(out / "eval.csv")[-1]  # the same figure from the evaluation during training
    assert float(during["top1"]) == pytest.approx(result["top1"], abs=1e-4)
    rows = read_csv(out / "log.csv")
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) - 1
    assert all(0 <= float(r["data_wait"]) < 1 and float(r["samples_per_s"]) > 0 for r in rows)


@pytest.mark.slow
def test_eval_on_an_image_folder(fashion_run, tmp_path):
    """The same checkpoint on a folder of class folders, class names taken from the folder names."""
    root, out, _ = fashion_run
    images, labels = fashion.load("test")
    for i in range(600):
        folder = tmp_path / fashion.CLASSNAMES[labels[i]].replace(" ", "_")
        folder.mkdir(exist_ok=True)
        (folder / f"{i}.png").write_bytes(fashion.png(images[i]))
    (tmp_path / "coat" / "broken.png").write_bytes(b"\x89PNG broken")
    proc = wit("eval", "--data", tmp_path, "--checkpoint", out / "checkpoints" / "step_00000150.pt",
               "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == 600 and result["top1"] > 0.5


# --- class names, open_clip's trainer, wit train's options -----------------------------------------

def png_of(colour: tuple[int, int, int], side: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_classnames_for_an_image_folder_are_matched_to_folders_by_name(tmp_path, capsys):
    """A --classnames file in another order than the folders' alphabetical one labels every image
    with its own folder's name; a name without a folder or a folder without a name is refused."""
    colours = {"Apple": (200, 0, 0), "mid_point": (0, 200, 0), "zebra": (0, 0, 200)}
    root = tmp_path / "set"
    for folder, colour in colours.items():
        (root / folder).mkdir(parents=True)
        for i in range(3):
            (root / folder / f"{i}.png").write_bytes(png_of(colour))
    (root / ".ipynb_checkpoints").mkdir()  # hidden: not a class, with --classnames or without
    (root / ".ipynb_checkpoints" / "0.png").write_bytes(png_of((9, 9, 9)))
    names = tmp_path / "names.txt"
    names.write_text("Mid Point\nzebra\napple\n")  # not the folders' order; case and '_' differ
    name_of_colour = {colour: folder.replace("_", " ").lower() for folder, colour in colours.items()}

    def labels_match(dataset, classnames):
        seen = 0
        for b in dataset:
            for image, label in zip(b["images"], b["labels"]):
                colour = tuple(int(v) for v in image[16, 16])
                assert classnames[int(label)].lower() == name_of_colour[colour], (colour, int(label))
                seen += 1
        assert seen == 9

    # During training (--eval-classnames) and in wit eval (--classnames).
    args = train.parser().parse_args(["--data", "x", "--steps", "1", "--output", str(tmp_path / "o"),
                                      "--eval-data", str(root), "--eval-classnames", str(names)])
    during = train.ZeroShotProbe(args, 32)
    labels_match(during.dataset, during.classnames)
    dataset, classnames = zeroshot.labelled_set(str(root), 32, 4, classnames=names)
    assert classnames == ["Mid Point", "zebra", "apple"]
    labels_match(dataset, classnames)
    # Without a file the folders name the classes, in alphabetical order.
    dataset, classnames = zeroshot.labelled_set(str(root), 32, 4)
    assert classnames == ["Apple", "mid point", "zebra"]
    labels_match(dataset, classnames)

    wrong = tmp_path / "wrong.txt"
    wrong.write_text("zebra\napple\nbanana\n")
    with pytest.raises(WitError) as e:
        zeroshot.labelled_set(str(root), 32, 4, classnames=wrong)
    assert "'banana'" in str(e.value) and "'mid_point'" in str(e.value) and str(wrong) in str(e.value)
    assert zeroshot.main(["--data", str(root), "--classnames", str(wrong), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "class names with no folder: 'banana'" in err and "folders with no class name: 'mid_point'" in err
    twice = tmp_path / "twice.txt"
    twice.write_text("zebra\napple\nmid point\nMid_Point\n")
    with pytest.raises(WitError, match="more than once: 'mid point' = 'Mid_Point'"):
        zeroshot.labelled_set(str(root), 32, 4, classnames=twice)


def test_open_clips_trainer_finds_sizes_and_the_tiny_model(tmp_path):
    """trainer.fashion writes sizes.json, which open_clip's trainer reads for the sample count; and
    docs/training.md's one line makes wit-tiny an open_clip model in a process that never imported ours."""
    from open_clip_train.data import get_dataset_size

    train_shards, test_shards = fashion.build(tmp_path, per_shard=40, limit=90)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    in_tars = {p.name: sum(m.name.endswith(".png") for m in tarfile.open(p)) for p in train_shards + test_shards}
    assert sizes == in_tars == {f"{split}-00000{i}.tar": n for split in ("train", "test")
                                for i, n in enumerate((40, 40, 10))}
    assert get_dataset_size(str(tmp_path / "train-{000000..000002}.tar")) == (90, 3)

    line = re.search(r"open_clip\.add_model_config\((['\"])([^'\"]+)\1\)",
                     (REPO / "docs" / "training.md").read_text())
    assert line, "docs/training.md documents open_clip.add_model_config(...)"
    script = ("import sys, open_clip\n"
              "assert 'wit-tiny' not in open_clip.list_models()\n"
              f"{line.group(0)}\n"
              "model = open_clip.create_model('wit-tiny')\n"
              "assert 'trainer' not in sys.modules\n"
              "print(model.visual.image_size, model.text_projection.shape[1], model.context_length)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-4:] == ["(32,", "32)", "128", "24"]


def test_wit_train_help_shows_every_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside a help text
    help_text = train.parser().format_help()
    # Each option's entry: its line and the indented lines under it, joined.
    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)|\n(?=\S)", help_text)]
    shown = 0
    for action in train.parser()._actions:
        if (not action.option_strings or action.required or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS)):
            continue
        entry = next(e for e in entries if e.startswith(action.option_strings[0] + " "))
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) \
            else str(action.default)
        assert entry.endswith(f"(default: {default})"), entry
        shown += 1
    assert shown >= 20
    assert "(default: 256)" in help_text and "(default: 100)" in help_text
    assert "default: None" not in help_text and "default: False" not in help_text


def test_a_warmup_not_shorter_than_the_run_is_warned_about(tmp_path, caplog):
    missing = "/nonexistent/shard-{000000..000001}.tar"  # fails after the arguments are checked
    for warmup, warned in ((50, True), (20, True), (19, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wit.train"):
            assert train.main(["--data", missing, "--steps", "20", "--warmup", str(warmup),
                               "--output", str(tmp_path / "run")]) == 2
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(f"--warmup {warmup} is not fewer than --steps 20" in m for m in messages) == warned, messages


def test_resume_refuses_another_batch_size(tmp_path, capsys):
    samples = [(f"s{i:03d}", png_of((8 * i, 255 - 8 * i, 128)), f"a square of shade {i}", b"{}")
               for i in range(24)]
    write_shard(str(tmp_path / "a.tar"), samples, "png")
    out = tmp_path / "run"

    def run(steps: int, batch_size: int) -> int:
        return train.main(["--data", str(tmp_path / "a.tar"), "--output", str(out), "--steps", str(steps),
                           "--batch-size", str(batch_size), "--workers", "0", "--warmup", "0",
                           "--save-every", "1", "--shuffle-buffer", "0", "--device", "cpu"])

    assert run(1, 8) == 0
    first = out / "checkpoints" / "step_00000001.pt"
    assert torch.load(first, weights_only=False)["batch_size"] == 8
    capsys.readouterr()
    assert run(2, 4) == 2
    err = capsys.readouterr().err
    assert str(first) in err and "--batch-size 8" in err and "--batch-size 4" in err
    assert not (out / "checkpoints" / "step_00000002.pt").exists()
    assert run(2, 8) == 0  # the same batch size resumes
    # A checkpoint from before the batch size was recorded is accepted.
    second = out / "checkpoints" / "step_00000002.pt"
    state = torch.load(second, weights_only=False)
    del state["batch_size"], state["args"]
    torch.save(state, second)
    assert run(3, 4) == 0
    assert [int(r["samples"]) for r in read_csv(out / "log.csv")][-1] == 8 + 8 + 4
