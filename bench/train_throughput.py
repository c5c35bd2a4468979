"""Training throughput of `tinyllama.model.LLM` against `transformers.LlamaForCausalLM`.

Both models get the same shape, the same weights, the same batch, the same number of
threads, the same optimizer (AdamW with the same hyperparameters) and the same dtype
(fp32 on the CPU). Runs are interleaved (ours, theirs, ours, theirs, ...) so that a
noisy neighbour slows both alike; the warmup steps of every run are excluded; each
model's figure is the median over the rounds. The ratio printed is ours / theirs.

Model FLOPs utilisation (MFU) = achieved model FLOP/s / peak FLOP/s, where the peak
is measured in the same run by timing a large fp32 matmul with the same thread count
(peak = 2 n^3 / t, best of several). Model FLOPs per trained token follow the PaLM
convention (Chowdhery et al. 2022, "PaLM", Appendix B):

    6 N + 12 L T d        (forward + backward; d = H * head_dim)

with N = the parameters used in matrix multiplies: attention, MLP and lm_head weights.
The input embedding table is a lookup, not a matmul, and is left out (as in Kaplan et
al. 2020); lm_head is counted (as nanoGPT's estimate_mfu does, and at vocab 4096 it is a
sixth of the work); RMSNorm gains are left out (negligible). The attention term counts
the full T x T score and value products, without halving for the causal mask, as PaLM
does. Both models do the same model FLOPs per token, so the ratio of MFUs equals the
ratio of throughputs; MFU says how far each is from the machine's matmul speed.

On a GPU (`--device cuda`, with `--bf16` and `--compile` as the gpu profile trains), the
peak is a matmul in the same dtype on the same device, and every timed run ends with a
device synchronisation.

Usage:  python bench/train_throughput.py [--batch 8] [--steps 4] [--warmup 2] [--rounds 5] [--quick]
                                         [--device cuda] [--bf16] [--compile]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from _machine import cpu_name  # bench/_machine.py (this folder is on sys.path when a script runs)
import torch.nn.functional as F

# The stories15M-like shape of llama2.c (with a 4096-token vocabulary, as in its custom-tokenizer models).
SHAPE = dict(vocab_size=4096, context_size=256, dim_emb=288, num_layers=6, num_heads=6, num_kv_heads=2,
             ffd_hidden_dim=768)
ADAMW = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)


DEVICE, DTYPE = torch.device("cpu"), torch.float32  # set by main()


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    "Best matmul FLOP/s over `repeats` (n x n) @ (n x n) products: 2 n^3 / t (DEVICE, DTYPE)."
    n = n if DEVICE.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=DEVICE, dtype=DTYPE) for _ in range(2))
    out = torch.empty(n, n, device=DEVICE, dtype=DTYPE)
    torch.mm(a, b, out=out)  # warm the BLAS up
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def linear_params(model: torch.nn.Module) -> int:
    "Parameters of the nn.Linear layers (attention, MLP, lm_head), shared ones once."
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return sum(w.numel() for w in weights.values())


def build_models(seed: int):
    "Our LLM and a LlamaForCausalLM (sdpa attention) holding the same weights."
    from transformers import LlamaConfig, LlamaForCausalLM
    from tinyllama.model import LLM, LLMConfig
    from tinyllama.interop import to_hf_config, to_hf_state_dict

    torch.manual_seed(seed)
    cfg = LLMConfig(**SHAPE)
    ours = LLM(cfg)
    hf_cfg = LlamaConfig.from_dict(to_hf_config(cfg))
    hf_cfg._attn_implementation = "sdpa"
    theirs = LlamaForCausalLM(hf_cfg)
    theirs.config.use_cache = False
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours), strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"weights did not map one-to-one: missing {missing}, unexpected {unexpected}")
    assert theirs.config._attn_implementation == "sdpa", theirs.config._attn_implementation
    return cfg, ours.train(), theirs.train()


def logits_of(model, x):
    out = model(x) if not hasattr(model, "get_decoder") else model(input_ids=x, use_cache=False).logits
    return out


def make_step(model, opt):
    "One optimizer step on (x, y): forward, cross-entropy, backward, AdamW."
    def step(x, y):
        with torch.autocast(DEVICE.type, dtype=DTYPE, enabled=DTYPE != torch.float32):
            logits = logits_of(model, x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def timed_run(step, batches, warmup: int, steps: int) -> tuple[float, float]:
    "(tokens per wall-clock second, tokens per CPU second of this process) over `steps` steps after `warmup`."
    for i in range(warmup):
        step(*batches[i % len(batches)])
    tokens = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        x, y = batches[(warmup + i) % len(batches)]
        step(x, y)
        tokens += x.numel()
    sync()
    return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--context", type=int, default=SHAPE["context_size"], help="tokens per sequence (default 256)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each run (default 2)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved runs per model; the median is reported (default 5)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads for both (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a short smoke run: batch 4, 2 timed steps, 1 warmup, 2 rounds")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (a GPU of compute capability 8+)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = p.parse_args(argv)
    global DEVICE, DTYPE
    DEVICE, DTYPE = torch.device(args.device), torch.bfloat16 if args.bf16 else torch.float32
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA GPU")
    if args.quick:
        args.batch, args.steps, args.warmup, args.rounds = 4, 2, 1, 2
    for name in ("batch", "context", "steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    if args.context > SHAPE["context_size"]:
        p.error(f"--context must be at most the model's context_size {SHAPE['context_size']}")

    import transformers
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()} | {os.cpu_count()} logical CPUs | torch threads {torch.get_num_threads()} | "
          f"torch {torch.__version__} | transformers {transformers.__version__} | python {platform.python_version()}")

    cfg, ours, theirs = build_models(args.seed)
    ours, theirs = ours.to(DEVICE), theirs.to(DEVICE)
    g = torch.Generator().manual_seed(args.seed)
    B, T = args.batch, args.context
    batches = []
    for _ in range(4):
        w = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
        batches.append((w[:, :-1].contiguous().to(DEVICE), w[:, 1:].contiguous().to(DEVICE)))

    # Same weights, same batch: the first losses must agree (else we would be timing different work).
    with torch.no_grad():
        l_ours = F.cross_entropy(logits_of(ours, batches[0][0]).flatten(0, 1), batches[0][1].flatten())
        l_theirs = F.cross_entropy(logits_of(theirs, batches[0][0]).flatten(0, 1), batches[0][1].flatten())
    if args.compile:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    if not torch.allclose(l_ours, l_theirs, atol=1e-4):
        raise SystemExit(f"the two models disagree on the same weights: loss {l_ours:.6f} vs {l_theirs:.6f}")

    # N and the FLOPs per token are the config's (LLMConfig.matmul_params, .flops_per_token:
    # chapter 06); the Linear layers both models hold are counted as a check of N.
    n_mm, fpt = cfg.matmul_params(), cfg.flops_per_token(T)
    assert n_mm == linear_params(ours) == linear_params(theirs), (n_mm, linear_params(theirs))
    n_total = sum(p.numel() for p in ours.parameters())
    print(f"shape: dim {cfg.dim_emb}, layers {cfg.num_layers}, heads {cfg.num_heads}, kv heads {cfg.num_kv_heads}, "
          f"hidden {cfg.ffd_hidden_dim}, vocab {cfg.vocab_size}, context {T}; batch {B} ({B * T} tokens/step); "
          f"{str(DTYPE).replace('torch.', '')} on {DEVICE}{', compiled' if args.compile else ''}; AdamW {ADAMW['lr']}, betas {ADAMW['betas']}, wd {ADAMW['weight_decay']}")
    print(f"params: {n_total / 1e6:.2f} M total, N = {n_mm / 1e6:.2f} M in matmuls; "
          f"model FLOPs/token = 6N + 12LTd = {fpt / 1e6:.1f} M (PaLM appendix B convention)")

    peaks = [matmul_peak_flops()]  # measured again every round: on a shared machine the best is the truest
    steps = {"ours": make_step(ours, torch.optim.AdamW(ours.parameters(), **ADAMW)),
             "transformers": make_step(theirs, torch.optim.AdamW(theirs.parameters(), **ADAMW))}
    results = {k: [] for k in steps}
    cpu_rates = {k: [] for k in steps}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]  # alternate who goes first
        for name in order:
            tps, tpc = timed_run(steps[name], batches, args.warmup, args.steps)
            results[name].append(tps)
            cpu_rates[name].append(tpc)
            print(f"  round {r + 1}/{args.rounds}  {name:<12} {tps:8.0f} tokens/s  {tpc:8.0f} tokens/CPU-s", flush=True)
        peaks.append(matmul_peak_flops(repeats=3))
    peak = max(peaks)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nmatmul peak ({str(DTYPE).replace('torch.', '')} on {DEVICE}, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s "
          f"(best of {len(peaks)} measurements; worst {min(peaks) / 1e9:.1f})")
    cmed = {k: statistics.median(v) for k, v in cpu_rates.items()}
    print(f"{'model':<14}{'tokens/s (median)':>19}{'min':>9}{'max':>9}{'MFU':>8}{'tokens/CPU-s':>14}")
    for k, v in results.items():
        print(f"{k:<14}{med[k]:>19.0f}{min(v):>9.0f}{max(v):>9.0f}{med[k] * fpt / peak:>8.1%}{cmed[k]:>14.0f}")
    ratio = med["ours"] / med["transformers"]
    cratio = cmed["ours"] / cmed["transformers"]
    print(f"\nratio ours / transformers: {ratio:.3f} wall-clock ({'meets' if ratio >= 1.0 else 'BELOW'} the >= 1.0 "
          f"target), {cratio:.3f} per CPU second  [{time.perf_counter() - t_start:.0f} s of timed runs]")
    print("(CPU time counts only the time this process ran, so it is the steadier figure on a busy shared machine;"
          " MFU uses wall-clock time.)")
    return ratio


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
