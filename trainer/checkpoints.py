"""A run folder's checkpoints, which wit train writes and resumes from and wit eval reads: a module
of their own, since train.py imports zeroshot.py and an import back would make a cycle."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from wit_builder.errors import WitError
from wit_builder.workspace import atomic_write_bytes

from . import models


class Checkpoints:
    """checkpoints/step_NNNNNNNN.pt, written atomically by rank 0; the newest few are kept."""

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = folder / "checkpoints", keep

    def all(self) -> list[Path]:
        return sorted(self.folder.glob("step_*.pt"))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, state: dict, step: int) -> Path:
        path = self.folder / f"step_{step:08d}.pt"
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(path, buf.getvalue())
        for old in self.all()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path


def load_checkpoint(path: Path) -> dict:
    state = models.read_checkpoint(path)
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise WitError("not a wit train checkpoint (no step or optimizer state); pass it as --init "
                       "to start from its weights", where=str(path))
    return state


def check_batch_size(state: dict, batch_size: int, where: Path) -> None:
    """A run resumes only at the batch size it was trained with (the schedule, the sample count and
    the loss's scale all assume it). Older checkpoints have it only among their saved arguments;
    one that has it nowhere passes."""
    saved = state.get("batch_size")
    if saved is None and isinstance(state.get("args"), dict):
        saved = state["args"].get("batch_size")
    if saved is not None and int(saved) != batch_size:
        raise WitError(f"checkpoint was trained with --batch-size {saved}, and this run asks for "
                       f"--batch-size {batch_size}; resume with --batch-size {saved}, or start afresh "
                       f"in another --output (or with --resume none)", where=str(where))
