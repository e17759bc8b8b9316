"""Zero-shot classification: class names x prompt templates -> text classifier -> top-1 / top-5.

A labelled set is an image folder (one sub-folder per class, named by the class) or WebDataset shards
whose samples carry a class index (a `.cls` member, or a field of the `.json` member). Class names and
templates come from files (one per line, templates with `{}` for the name), or default to the folder
names, a classnames.txt beside the shards, and open_clip's 80 ImageNet templates. A class-name file
given with an image folder is matched to the folders by name (case and '_' for ' ' aside), never by
position; a name without a folder or a folder without a name is an error. Each class's prompts are
averaged in embedding space (open_clip's build_zero_shot_classifier).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from wit_builder import storage
from wit_builder.errors import WitError

from . import data
from .checkpoints import Checkpoints
from .models import Normalise
from .progress import Progress

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def read_lines(path: str | Path) -> list[str]:
    try:
        if storage.is_object_url(str(path)):
            with storage.errors_named(str(path)):
                text = storage.read_bytes(str(path)).decode("utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        lines = [line.strip() for line in text.splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise WitError(f"cannot read: {e}", where=str(path)) from e
    lines = [line for line in lines if line]
    if not lines:
        raise WitError("is empty", where=str(path))
    return lines


def read_templates(path: str | Path | None) -> list:
    if path is None:
        return list(OPENAI_IMAGENET_TEMPLATES)
    templates = read_lines(path)
    for i, t in enumerate(templates, 1):
        if t.count("{}") != 1:
            raise WitError(f"template {t!r} needs exactly one {{}} for the class name",
                           where=str(path), record=f"line {i}")
    return templates


class ImageFolder(torch.utils.data.IterableDataset):
    """root/<class>/<image>: centre-cropped uint8 batches with labels, split over workers."""

    def __init__(self, root: Path, image_size: int, batch_size: int, classes: list[str] | None = None):
        """classes: the sub-folders in class-index order (default: alphabetical)."""
        super().__init__()
        self.classes = classes if classes is not None else class_folders(root)
        self.files = [(f, c) for c, name in enumerate(self.classes)
                      for f in sorted((root / name).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise WitError("no images in class sub-folders", where=str(root))
        self.size, self.batch_size, self.skipped = image_size, batch_size, 0

    def __iter__(self):
        my_slot, slots = data.slot()
        images, labels = [], []
        for path, label in self.files[my_slot::slots]:
            try:
                images.append(data.load_image(path.read_bytes(), self.size, None))
                labels.append(label)
            except (OSError, data.BrokenSample) as e:
                self.skipped += 1
                data.log.warning("skipped %s: %s", path, e)
            if len(images) == self.batch_size:
                yield batch(images, labels)
                images, labels = [], []
        if images:
            yield batch(images, labels)


def class_folders(root: Path) -> list[str]:
    """The class sub-folders; hidden ones (.ipynb_checkpoints, .cache) are not classes."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def same_name(name: str) -> str:
    """The form names and folders are matched in: case-insensitive, '_' equal to ' '."""
    return " ".join(name.replace("_", " ").casefold().split())


def match_folders(root: Path, classnames: list[str], where: str | None = None) -> list[str]:
    """The class folder for each class name, in the names' order; an error when a name has no
    folder, a folder has no name, or a match is ambiguous."""
    folders: dict[str, list[str]] = {}
    for folder in class_folders(root):
        folders.setdefault(same_name(folder), []).append(folder)
    names: dict[str, list[str]] = {}
    for name in classnames:
        names.setdefault(same_name(name), []).append(name)
    problems = []
    if unnamed := [f for key, fs in folders.items() if key not in names for f in fs]:
        problems.append(f"folders with no class name: {', '.join(map(repr, unnamed))}")
    if missing := [n for key, ns in names.items() if key not in folders for n in ns]:
        problems.append(f"class names with no folder: {', '.join(map(repr, missing))}")
    if repeated := [ns for ns in names.values() if len(ns) > 1]:
        problems.append("class names given more than once: "
                        + "; ".join(" = ".join(map(repr, ns)) for ns in repeated))
    if clashing := [fs for fs in folders.values() if len(fs) > 1]:
        problems.append("folders that only differ in case or '_': "
                        + "; ".join(" = ".join(map(repr, fs)) for fs in clashing))
    if problems:
        raise WitError("the class names do not match the class folders of " + str(root) + " (names "
                       "match folders ignoring case, with '_' equal to ' '): " + "; ".join(problems),
                       where=where)
    return [folders[same_name(name)][0] for name in classnames]


def batch(images: list[np.ndarray], labels: list[int]) -> dict:
    return {"images": torch.from_numpy(np.stack(images)), "labels": torch.tensor(labels)}


def labelled_set(spec: str, image_size: int, batch_size: int, class_key: str = "cls",
                 classnames: str | Path | None = None):
    """Return (dataset, class names or None) for a folder of class folders or shards.

    classnames: a file of class names. For shards its lines are the class indices' names in order;
    for an image folder each name is matched to the folder of that name (ignoring case, '_' equal
    to ' ') and the class indices follow the file's order. Without it, a folder's classes are its
    sub-folders in alphabetical order, and shards' names come from a classnames.txt beside them.
    """
    names = read_lines(classnames) if classnames else None
    path = Path(spec)
    if path.is_dir() and not any(path.glob("*.tar")):
        if names is None:
            folder = ImageFolder(path, image_size, batch_size)
            return folder, [c.replace("_", " ") for c in folder.classes]
        classes = match_folders(path, names, where=str(classnames))
        return ImageFolder(path, image_size, batch_size, classes), names
    sources = data.sources([spec])
    stream = data.ShardStream(sources, None, image_size, batch_size, labels=class_key)
    if names is not None:
        return stream, names
    return stream, classnames_beside(sources[0].urls[0])


def classnames_beside(shard: str) -> list[str] | None:
    """The classnames.txt in the shard's folder (or prefix, in an object store), if there is one."""
    beside = storage.sibling(shard, "classnames.txt")
    return read_lines(beside) if storage.is_file(beside) else None


@torch.no_grad()
def evaluate(model, tokenizer, dataset, classnames: list[str], templates: list, mean, std,
             device: torch.device, workers: int = 0, autocast=None, progress: bool = False) -> dict:
    """Top-1 and top-5 accuracy of a CLIP model (top-5 is top-k for fewer than five classes)."""
    was_training = model.training
    model.eval()
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer, classnames, templates, num_classes_per_batch=10, device=device)
    normalise = Normalise(mean, std).to(device)
    k = min(5, len(classnames))
    correct1 = correctk = seen = 0
    batches = data.loader(dataset, workers)
    with Progress(None, "zero-shot", "batch", "batches", disable=not progress) as bar:
        for batch in batches:
            labels = batch["labels"].to(device)
            if int(labels.max()) >= len(classnames) or int(labels.min()) < 0:
                raise WitError(f"class index {int(labels.max())} but only {len(classnames)} class names")
            with autocast or torch.autocast(device.type, enabled=False):
                features = model.encode_image(normalise(batch["images"].to(device)), normalize=True)
            top = (features.float() @ classifier.float()).topk(k, dim=1).indices
            hits = top == labels[:, None]
            correct1 += int(hits[:, 0].sum())
            correctk += int(hits.any(dim=1).sum())
            seen += len(labels)
            bar.update()
    model.train(was_training)
    if not seen:
        raise WitError("the evaluation set yielded no images")
    return {"top1": correct1 / seen, "top5": correctk / seen, "images": seen}


def main(argv: list[str] | None = None) -> int:
    """wit eval: zero-shot top-1 / top-5 of a checkpoint on a labelled set."""
    import argparse
    import json
    import logging
    import sys

    from . import models

    p = argparse.ArgumentParser(prog="wit eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="image folder (one sub-folder per class) or shards")
    p.add_argument("--model", help="open_clip architecture (default: the one a wit train checkpoint "
                                   "names, else wit-tiny)")
    p.add_argument("--checkpoint", help="weights to evaluate: a checkpoint file (wit train's or "
                                        "open_clip's) or a wit train run folder (its newest); "
                                        "without one the model is untrained")
    p.add_argument("--classnames", help="file, one class name per line: in class-index order for "
                                        "shards; for an image folder each name is matched to the "
                                        "sub-folder of that name (case and '_' for ' ' aside)")
    p.add_argument("--templates", help="file, one template per line with {} (default: 80 ImageNet)")
    p.add_argument("--class-key", default="cls", help="the shards' class field (.cls or in .json)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    try:
        checkpoint = args.checkpoint
        if checkpoint and Path(checkpoint).is_dir():
            checkpoint = Checkpoints(Path(checkpoint), keep=0).latest()
            if checkpoint is None:
                raise WitError("no checkpoints/step_*.pt in this run folder", where=args.checkpoint)
        state = models.read_checkpoint(checkpoint) if checkpoint else None
        name = args.model or (isinstance(state, dict) and state.get("model")) or "wit-tiny"
        model, tokenizer, size, mean, std = models.create(name, device=device)
        if state is not None:
            models.load_state(model, state, str(checkpoint))
        dataset, classnames = labelled_set(args.data, size, args.batch_size, args.class_key,
                                           args.classnames)
        if not classnames:
            raise WitError("no class names: pass --classnames, or put classnames.txt beside the shards",
                           where=args.data)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
        result = evaluate(model, tokenizer, dataset, classnames, read_templates(args.templates),
                          mean, std, device, args.workers, autocast, progress=True)
    except WitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"zero-shot top-1 {result['top1']:.2%}  top-5 {result['top5']:.2%}  "
              f"({result['images']} images, {len(classnames)} classes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
