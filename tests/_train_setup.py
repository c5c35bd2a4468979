"Shared tiny set-up of the training tests and the DDP worker (same model, data and config in both)."
import torch
from tinyllama.model import LLM, LLMConfig
from tinyllama.train import IGNORE_INDEX, NextTokenPredictionDataset, TrainingConfig

TINY = dict(vocab_size=48, context_size=16, dim_emb=32, num_layers=2, num_heads=4, num_kv_heads=2, ffd_hidden_dim=64)

def tiny_stream(n=4000, vocab=48, seed=0):
    "A token stream with structure to learn: a noisy counter modulo vocab."
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(1, 3, (n,), generator=g)
    return torch.cumsum(steps, 0) % vocab

class RaggedTargets:
    """A batch source (no base class: train only needs `context_size` and `batch`) whose rows keep
    1 to 16 targets, the rest IGNORE_INDEX, like chats with replies of different lengths. Row i of
    the global batch keeps KEPT[i % 8] targets whatever the rank, so micro-batches hold very different
    numbers of targets (batch 8 in two micro-batches: 7 and 60; under DDP rank 0's: 3 and 28)."""
    KEPT = torch.tensor([1, 1, 2, 3, 16, 16, 12, 16])

    def __init__(self, windows):
        self.windows, self.context_size, self.seed = windows, windows.context_size, windows.seed

    def batch(self, step, batch_size, rank=0, world_size=1):
        x, y = self.windows.batch(step, batch_size)  # the global batch, then this rank's rows
        kept = self.KEPT[torch.arange(batch_size) % len(self.KEPT)]
        y = torch.where(torch.arange(self.context_size) < kept[:, None], y, IGNORE_INDEX)
        return x[rank::world_size], y[rank::world_size]

def tiny_setup(steps=5, ragged=False, **overrides):
    "(model, data, config) of a small deterministic fp32 CPU run; ragged: RaggedTargets data."
    torch.manual_seed(0)
    model = LLM(LLMConfig(**TINY))
    data = NextTokenPredictionDataset(tiny_stream(), context_size=16, seed=1)
    if ragged:
        data = RaggedTargets(data)
    cfg = dict(steps=steps, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=0, log_every=1,
               precision="fp32", device="cpu", seed=0)
    cfg.update(overrides)
    return model, data, TrainingConfig(**cfg)
