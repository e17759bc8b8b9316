"""One contrastive step of the trainer on a fixed global batch; run under torchrun (gloo on CPU).

Each of the WORLD_SIZE ranks takes its slice of the same global batch; rank 0 saves the mean loss
and the gradients DDP leaves on every parameter, to compare with one process on the whole batch.
    torchrun --nproc-per-node 2 tests/ddp_step.py OUT.pt [--no-gather]
"""

import sys

import torch

from trainer import models, train

GLOBAL_BATCH = 16


def main(out: str, gather: bool = True) -> None:
    env = train.Distributed("cpu")
    torch.manual_seed(0)
    model, tokenizer, size, mean, std = models.create("wit-tiny")
    images = torch.randint(0, 256, (GLOBAL_BATCH, size, size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    texts = tokenizer([f"a photo of thing number {i}" for i in range(GLOBAL_BATCH)])
    per_rank = GLOBAL_BATCH // env.world
    mine = slice(env.rank * per_rank, (env.rank + 1) * per_rank)
    wrapped, loss_fn = train.parallel(model, env)
    if not gather:  # the control: each rank contrasts only against its own samples
        loss_fn.world_size = 1
    loss = train.contrastive_loss(wrapped, loss_fn, models.Normalise(mean, std)(images[mine]), texts[mine])
    loss.backward()
    result = {"loss": env.mean(loss.item()),
              "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    if env.rank == 0:
        torch.save(result, out)
    if env.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], "--no-gather" not in sys.argv)
