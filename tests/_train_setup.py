"Shared tiny set-up of the training tests and the DDP worker (same model, data and config in both)."
import torch
from tinyllama.model import LLM, LLMConfig
from tinyllama.train import NextTokenPredictionDataset, TrainingConfig

TINY = dict(vocab_size=48, context_size=16, dim_emb=32, num_layers=2, num_heads=4, num_kv_heads=2, ffd_hidden_dim=64)

def tiny_stream(n=4000, vocab=48, seed=0):
    "A token stream with structure to learn: a noisy counter modulo vocab."
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(1, 3, (n,), generator=g)
    return torch.cumsum(steps, 0) % vocab

def tiny_setup(steps=5, **overrides):
    "(model, data, config) of a small deterministic fp32 CPU run."
    torch.manual_seed(0)
    model = LLM(LLMConfig(**TINY))
    data = NextTokenPredictionDataset(tiny_stream(), context_size=16, seed=1)
    cfg = dict(steps=steps, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=0, log_every=1,
               precision="fp32", device="cpu", seed=0)
    cfg.update(overrides)
    return model, data, TrainingConfig(**cfg)
