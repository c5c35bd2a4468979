"""Pieces shared by the RL tests (test_ppo.py, test_ppo_bugs.py, test_grpo.py): a tiny
vocabulary, prompts of several lengths, and a spy on the decoding loop's sampler."""
import importlib

import torch

generate_module = importlib.import_module("tinyllama.generate")  # the module, not the function

BOS, EOS, PAD = 1, 2, 3  # special ids of the tiny vocabulary
V = 12  # its size


def prompts(n=16, seed=0):
    "n prompts of 1-5 random ids and an EOS: different lengths, so left padding is exercised."
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 6, (1,), generator=g))
        out.append(torch.randint(4, V, (k,), generator=g).tolist() + [EOS])
    return out


def record_sampler(monkeypatch):
    "Record the logits and temperature the decoding loop samples from, one entry per step."
    seen = []
    real = generate_module._sample

    def spy(logits, temperature, *args):
        seen.append((logits.detach().clone(), temperature))
        return real(logits, temperature, *args)

    monkeypatch.setattr(generate_module, "_sample", spy)
    return seen
