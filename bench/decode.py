"""Batch-1 greedy decoding speed of `tinyllama.generate` against `transformers` `generate`.

Three decoders produce the same number of new tokens from the same prompt with the same
weights (fp32 on the CPU, the same thread count):

- ours:     `tinyllama.generate.generate(..., temperature=0)` with the KV cache (the default);
- hf:       `transformers.LlamaForCausalLM.generate` (sdpa attention, its own KV cache, greedy),
            the weights copied with `tinyllama.interop.to_hf_state_dict`; end-of-sequence is
            disabled and `min_new_tokens` = `max_new_tokens` forces the length;
- no-cache: `tinyllama.generate.generate(..., use_cache=False)`, which runs the whole sequence
            through the model again for every new token;
- ours compiled: `tinyllama.generate.CompiledDecoder`, the same single-token step (`decode_step`)
            compiled by `torch.compile` with fixed shapes (a whole-context cache, the position as a
            tensor, a mask), guard checks skipped after the first call, and its default
            `steps_per_call` (4) greedy steps per compiled call, each step's argmax fed to the next
            inside the compiled code (steps past the requested length are computed and discarded);
            its compile time is printed and excluded (it happens in the warm-up);
- ours via forward: the KV cache but every step through `LLM.forward` (modules, validation,
            masks) instead of `generate`'s single-token `decode_step`: what that step buys;
- bare matvecs: per new token only the products of a vector with each weight matrix, nothing else.
            No decoder of these fp32 weights can be faster, so transformers' time over this one is the
            largest ratio any decoder could show against it on this machine (printed as the ceiling).

Threads: one by default. Batch-1 decoding multiplies vectors by matrices, which a second thread
barely speeds up, and on a shared machine a second thread mostly waits for a busy core. Both
the wall-clock time and the process CPU time are measured; on a busy shared machine the CPU
time is the steadier of the two (it does not count the time the process waits for a core).

Runs are interleaved (ours, hf, no-cache, ours, hf, ...) so that a noisy neighbour slows all
alike, one warm-up run of each is excluded, and each figure is the median over the rounds.
The prompt length is included in neither count: tokens/s = new tokens / wall time of the call
(prefill included, as a user of `generate` sees it).

The default shape is "stories15M-like": the width, depth and heads of llama2.c's stories15M
(dim 288, 6 layers, 6 heads, hidden 768) but with grouped-query attention (2 kv heads) and a
4096-token vocabulary, 7.7 M parameters (untied embeddings). The real stories15M has 6 kv heads
(plain multi-head attention), a 32,000-token vocabulary and about 15 M parameters. Context: 256
new tokens after a 16-token prompt need 272 positions, so context_size = 512 here (stories15M
has 256). The weights are trained: the speed of a forward pass does not depend on their values, but random
weights give near-ties everywhere, and a greedy check that tolerates near-ties cannot see a real
bug. So the model is first trained for --train-steps steps on the story world (about a minute; the
weights are cached) and every decoder's greedy tokens must equal the reference's: at the first
difference the top-2 logit gap there must be a near-tie (< 1e-4, reported), otherwise the bench
prints FAIL and exits with status 1 before timing anything (bench/_decode_checks.py).

The real stories15M shape ("stories15M": 6 kv heads, vocab 32,000) is available beside the GQA
one; its cache-free decoder is left out (it would recompute a 32,000-way head for every position).

Int8 (`tinyllama.quantize`, chapter 08b): "int8 (KV cache)" is `generate` on
`quantize_int8(model)`, "int8 compiled" the `CompiledDecoder` on it (when it accepts int8 models),
"bare int8 matvecs" the int8 floor (PyTorch's int8 weight-pack matmul only). The int8 decoders are
checked against each other; against fp32 the bench prints held-out NLL / entropy floor for fp32,
bf16 and int8 and the share of greedy tokens equal to fp32's (quality, not a pass/fail check).

torchao (optional: `pip install -e ".[bench]"`, which `make bench` does; without it the bench prints
a line saying so and skips these rows): the same weights quantised by torchao's
`Int8WeightOnlyConfig` (per-row int8 too, its scale max|row|/127.5), run by the same single-token
step as "ours compiled" (fused q|k|v and gate|up, whole-context caches, bf16 activations into each
Linear), but one step per compiled call (ours runs `steps_per_call` = 4 per call: part of the gap
between the two rows at small shapes is that, not the int8 products). "torchao int8 compiled" is that step under torch.compile, where inductor lowers torchao's
`mm(x, q.t().to(bf16)) * scales` to PyTorch's int8 weight-pack kernel; "torchao int8, eager kernel"
is its reference, the same step calling that kernel on torchao's q and scales directly. The two
must agree on every greedy token. torchao's own eager path is not timed: it rounds the product to
bf16 before scaling (other arithmetic, so its tokens may differ at a one-bf16-unit gap) and converts
each int8 matrix to bf16 on every call. Quality adds torchao's NLL / floor.

The load average is printed before and after: the bench's machine may be shared.

Usage:  python bench/decode.py [--shape stories15M-like|course-cpu|stories15M] [--new-tokens 256] [--prompt 16] [--rounds 5] [--threads N] [--quick]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings

import torch

# transformers imports torchao when it is installed: its CUDA-only extensions then fail to load (harmless)
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from _machine import cpu_name, load_average  # bench/_machine.py (this folder is on sys.path when a script runs)
from _decode_checks import (check_agreement, int8_runners, quality, story_prompt, torchao_runners,
                            trained_model)

SHAPES = {
    # stories15M's width, depth and heads, but GQA (2 kv heads) and a 4096-token vocabulary:
    # 7.7 M parameters (the real stories15M: 6 kv heads, vocab 32000, ~15 M); context 512 fits 16 + 256
    "stories15M-like": dict(vocab_size=4096, context_size=512, dim_emb=288, num_layers=6, num_heads=6, num_kv_heads=2,
                       ffd_hidden_dim=768),
    # the model chapter 07 pretrains in the cpu profile (and `tinyllama speedrun` decodes from), context 512
    "course-cpu": dict(vocab_size=768, context_size=512, dim_emb=128, num_layers=4, num_heads=4, num_kv_heads=2,
                       ffd_hidden_dim=384),
    # llama2.c's real stories15M: 6 kv heads (multi-head attention), vocab 32000; context 512 fits 16 + 256
    "stories15M": dict(vocab_size=32000, context_size=512, dim_emb=288, num_layers=6, num_heads=6, num_kv_heads=6,
                       ffd_hidden_dim=768),
}
SHAPE = SHAPES["stories15M-like"]


def build_models(steps: int = 100, retrain: bool = False):
    "Our trained LLM, a transformers LlamaForCausalLM with the same weights, tokenizer, held-out stories."
    from transformers import LlamaConfig, LlamaForCausalLM
    from tinyllama.model import LLM, LLMConfig
    from tinyllama.interop import to_hf_config, to_hf_state_dict
    ours, tok, held = trained_model(SHAPE, steps, retrain)
    hf_cfg = {k: v for k, v in to_hf_config(ours.config).items() if k not in ("architectures", "model_type")}
    hf_cfg.update(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    theirs = LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="sdpa")).eval()
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours), strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise SystemExit(f"weights did not map: missing {missing}, unexpected {unexpected}")
    return ours, theirs, tok, held


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every decoder (default 1)")
    ap.add_argument("--quick", action="store_true", help="64 new tokens, 2 rounds: a smoke test")
    ap.add_argument("--train-steps", type=int, default=100, help="training steps of the bench's model (cached)")
    ap.add_argument("--retrain", action="store_true", help="train again even if cached weights exist")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="stories15M-like",
                    help="model shape (default stories15M-like; course-cpu: the chapter-07 cpu-profile model)")
    args = ap.parse_args(argv)
    global SHAPE
    SHAPE = SHAPES[args.shape]
    if args.quick:
        args.new_tokens, args.rounds = 64, 2
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from tinyllama.generate import generate

    ours, theirs, tok, held = build_models(args.train_steps, args.retrain)
    n = args.new_tokens
    if args.prompt + n > SHAPE["context_size"]:
        raise SystemExit(f"--prompt {args.prompt} + --new-tokens {n} exceed context_size={SHAPE['context_size']}")
    prompt = story_prompt(tok, held, args.prompt)  # the start of held-out stories

    def run_ours():
        return generate(ours, [prompt], max_new_tokens=n, temperature=0)[0]

    from tinyllama.generate import CompiledDecoder
    compiled = CompiledDecoder(ours)
    t0 = time.perf_counter()
    compiled.generate(prompt, n)  # compiles the step
    compile_s = time.perf_counter() - t0

    def run_compiled():
        return compiled.generate(prompt, n)

    def run_nocache():
        return generate(ours, [prompt], max_new_tokens=n, temperature=0, use_cache=False)[0]

    def run_hf():
        with torch.inference_mode():
            out = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                  eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    def run_forward():
        from tinyllama.generate import decode_steps
        return [int(t[0]) for t, _ in decode_steps(ours, [prompt], n, temperature=0, fast=False)]

    # The floor under any decoder of these fp32 weights: per new token, one product of a vector with each
    # weight matrix (q|k|v, o, gate|up and down per block, then the output head), stored in the layout that
    # is fastest here, and nothing else: no attention, no norms, no Python around them.
    mats = [w.t().contiguous() for blk in ours.layers for w in (
        torch.cat([blk.self_attn.q_proj.weight, blk.self_attn.k_proj.weight, blk.self_attn.v_proj.weight]),
        blk.self_attn.o_proj.weight, torch.cat([blk.mlp.gate_proj.weight, blk.mlp.up_proj.weight]),
        blk.mlp.down_proj.weight)] + [ours.lm_head.weight.t().contiguous()]
    vecs = [torch.randn(1, w.shape[0]) for w in mats]

    def run_matvecs():
        with torch.inference_mode():
            for _ in range(n):
                for x, w in zip(vecs, mats):
                    x @ w
        return [0] * n

    runners = {"ours (KV cache)": run_ours, "ours compiled": run_compiled, "transformers generate": run_hf, "ours, no cache": run_nocache,
               "ours via LLM.forward": run_forward, "bare matvecs (floor)": run_matvecs}
    if SHAPE["vocab_size"] >= 32000:
        del runners["ours, no cache"]  # a 32000-way head for every position of every step: minutes
    q8, int8 = int8_runners(ours, prompt, n)
    runners |= int8
    ao = torchao_runners(ours, prompt, n)  # None without torchao (a printed line says so)
    if ao is not None:
        runners |= ao[1]
    import transformers
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"before: {load_average()}")
    print(f"shape: {args.shape} {SHAPE}; batch 1, prompt {args.prompt} tokens, {n} new tokens, greedy, fp32; "
          f"{args.rounds} interleaved rounds after one warm-up each")
    tokens = {name: fn() for name, fn in runners.items()}  # warm-up, and the tokens for the check
    print(f"ours compiled: the first call compiled the step in {compile_s:.1f} s (not counted below)")
    fp32 = {k: v for k, v in tokens.items() if "int8" not in k and "floor" not in k}
    failures = check_agreement(ours, prompt, fp32, "ours (KV cache)")
    failures += check_agreement(q8, prompt, {k: v for k, v in tokens.items() if k.startswith("int8")},
                                "int8 (KV cache)")
    if ao is not None:
        failures += check_agreement(None, prompt, {k: v for k, v in tokens.items() if k.startswith("torchao")},
                                    "torchao int8, eager kernel", gap=ao[2])
    if failures:
        print(f"FAIL: {len(failures)} decoder(s) disagree on a greedy token that is not a near-tie; "
              "no timings for decoders that do not compute the same thing")
        return 1
    wall = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, fn in runners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            assert len(out) == n, (name, len(out))
        print(f"round {r + 1}: " + ", ".join(f"{k} {n / v[-1]:.0f} tok/s" for k, v in wall.items()), flush=True)
    med_wall = {k: n / statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: n / statistics.median(v) for k, v in cpu.items()}
    print(f"\n{'decoder':28s} {'tokens/s (wall)':>16s} {'tokens/CPU-s':>14s}   (medians)")
    for k in runners:
        print(f"{k:28s} {med_wall[k]:16.1f} {med_cpu[k]:14.1f}")
    ours_key = "ours (KV cache)"
    for other, target in [("transformers generate", "acceptance >= 5x, goal 10x"), ("ours, no cache", "acceptance >= 4x"),
                          ("ours via LLM.forward", "what decode_step buys")]:
        if other not in runners:
            continue
        print(f"ratio ours / {other:22s} wall {med_wall[ours_key] / med_wall[other]:5.2f}x   "
              f"CPU time {med_cpu[ours_key] / med_cpu[other]:5.2f}x   ({target})")
    for other, target in [("transformers generate", "acceptance >= 5x, goal 10x"), ("ours (KV cache)", "what compiling buys")]:
        print(f"ratio ours compiled / {other:22s} wall {med_wall['ours compiled'] / med_wall[other]:5.2f}x   "
              f"CPU time {med_cpu['ours compiled'] / med_cpu[other]:5.2f}x   ({target})")
    for k, target in [("int8 (KV cache)", ""), ("int8 compiled", "target >= 4x at stories15M-like, >= 10x at course-cpu"),
                      ("torchao int8, eager kernel", ""),
                      ("torchao int8 compiled", "torchao's int8 weight-only, same step")]:
        if k in runners:
            print(f"ratio {k} / transformers generate   wall {med_wall[k] / med_wall['transformers generate']:5.2f}x   "
                  f"CPU time {med_cpu[k] / med_cpu['transformers generate']:5.2f}x   {target}")
    f8 = "bare int8 matvecs (floor)"
    print(f"int8 ceiling: transformers / bare int8 matvecs   CPU time "
          f"{med_cpu[f8] / med_cpu['transformers generate']:5.2f}x")
    floor, hf = "bare matvecs (floor)", "transformers generate"
    print(f"ceiling: transformers / bare matvecs   wall {med_wall[floor] / med_wall[hf]:5.2f}x   "
          f"CPU time {med_cpu[floor] / med_cpu[hf]:5.2f}x   (no decoder of these fp32 weights can beat "
          f"transformers by more; ours reaches {med_cpu[ours_key] / med_cpu[floor]:.0%} of the floor's speed, "
          f"compiled {med_cpu['ours compiled'] / med_cpu[floor]:.0%})")
    q = quality(ours, q8, tok, held, ao=None if ao is None else ao[0])
    hf = "transformers generate"
    ratio = lambda k: f"{med_cpu[k] / med_cpu[hf]:.2f}x" if k in runners else "n/a"  # noqa: E731
    nll = ", ".join(f"{k} {r:.4f} ({100 * (r / q['fp32'][0] - 1):+.2f}%)" for k, (r, _) in q.items())
    print(f"summary ({args.shape}, CPU time vs {hf}): fp32 compiled {ratio('ours compiled')}, "
          f"int8 compiled {ratio('int8 compiled')}, torchao int8 compiled {ratio('torchao int8 compiled')}; "
          f"NLL / floor {nll}")
    print(f"after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
