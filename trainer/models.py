"""open_clip models for training: by name (ViT-B-32, RN50, ...) or from the project's own configs.

Models start from random weights. A local checkpoint (this trainer's or open_clip's) may be loaded;
nothing is ever fetched from a hub.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import open_clip
import torch

from wit_builder.errors import WitError

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)

MAX_LOGIT_SCALE = math.log(100)


def create(name: str, checkpoint: str | None = None, device: str | torch.device = "cpu"):
    """Return (model, tokenizer, image_size, mean, std) for an open_clip architecture name."""
    if name not in open_clip.list_models():
        raise WitError(f"unknown model {name!r}; open_clip knows {len(open_clip.list_models())} "
                       f"architectures (open_clip.list_models()), and {CONFIG_DIR} adds wit-tiny")
    # open_clip logs every step of model creation, and warns that no pretrained weights were loaded.
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(name, pretrained=None, device=device, output_dict=True)
        tokenizer = open_clip.get_tokenizer(name)
    finally:
        logging.disable(logging.NOTSET)
    if checkpoint:
        load_weights(model, checkpoint)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return model, tokenizer, int(size), tuple(mean), tuple(std)


def read_checkpoint(path: str | Path):
    """A checkpoint file's contents, or an error that names the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises pickle, zip, OS and runtime errors alike
        raise WitError(f"cannot read checkpoint: {e}", where=str(path)) from e


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load weights from this trainer's checkpoints or open_clip's (both keep a 'state_dict')."""
    load_state(model, read_checkpoint(path), path)


def load_state(model: torch.nn.Module, state: dict, where: str) -> None:
    """A state dict, or a checkpoint that holds one under 'state_dict', into the model."""
    if not isinstance(state, dict):
        raise WitError("not a state dict or checkpoint", where=where)
    state = state.get("state_dict", state)
    # DDP and torch.compile prefix the names of the models they wrap.
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise WitError(f"checkpoint does not fit the model: {str(e).splitlines()[0]}", where=where) from e


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the weight matrices only, never gains, biases, or the logit scale."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # Every gain, bias, norm weight and the logit scale has fewer than two dimensions.
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class Normalise(torch.nn.Module):
    """uint8 NHWC batches become normalised float NCHW on the device, not in the loader."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
