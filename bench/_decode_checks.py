"""What makes bench/decode.py honest: trained weights, a strict greedy check, int8 decoders, quality.

- `trained_model`: the bench's model trained on the story world for a fixed number of steps (cached
  under the course's cache folder), so that greedy choices have clear margins; random weights give
  near-ties everywhere, and a near-tie can hide a real difference between two decoders.
- `check_agreement`: every decoder's greedy tokens must equal the reference's; at the first token
  where one differs, the reference model's top-2 logit gap there must be a near-tie (< NEAR_TIE),
  which is reported, or the check fails (the bench then exits non-zero).
- `int8_runners`: the int8 decoders (`tinyllama.quantize`) and the int8 bare-matvec floor.
- `quality`: held-out NLL / entropy floor in fp32, bf16 and int8, and greedy agreement with fp32.
"""
from __future__ import annotations

import hashlib
import json
import time

import torch

NEAR_TIE = 1e-4  # a top-2 logit gap below this is a tie in float arithmetic


def _story_data(n_train: int = 3000, n_held: int = 100, vocab: int = 768):
    from tinyllama.data import train_heldout
    from tinyllama.tokenizer import train_tokenizer

    stories, held = train_heldout(n_train, n_held, seed=0)
    texts = [s.text for s in stories]
    return texts, held, train_tokenizer(texts, vocab_size=vocab)


def trained_model(shape: dict, steps: int = 100, retrain: bool = False):
    "(LLM of `shape` trained `steps` steps on the story world, tokenizer, held-out stories)."
    from tinyllama.data import default_cache_dir
    from tinyllama.model import LLM, LLMConfig
    from tinyllama.train import NextTokenPredictionDataset, TrainingConfig, tokenize_stories, train

    texts, held, tok = _story_data(vocab=min(768, shape["vocab_size"]))
    key = hashlib.sha256(json.dumps([shape, steps], sort_keys=True).encode()).hexdigest()[:12]
    path = default_cache_dir() / "bench_decode" / f"{key}.pt"
    torch.manual_seed(0)
    model = LLM(LLMConfig(**shape))
    if path.exists() and not retrain:
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"weights: trained {steps} steps on the story world (cached: {path})")
        return model.eval(), tok, held
    t0 = time.perf_counter()
    data = NextTokenPredictionDataset(tokenize_stories(texts, tok), 64, seed=0)
    cfg = TrainingConfig(steps=steps, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=max(steps // 10, 1),
                         eval_every=0, log_every=max(steps // 5, 1), precision="fp32", device="cpu")
    res = train(model, data, cfg, progress=False)
    loss = [h["loss"] for h in res.history if "loss" in h]
    print(f"weights: trained {steps} steps on the story world in {time.perf_counter() - t0:.0f} s "
          f"(loss {loss[0]:.2f} -> {loss[-1]:.2f}); cached in {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval(), tok, held


def story_prompt(tok, held, length: int) -> list[int]:
    "The first `length` tokens of held-out stories (BOS first), joined if one is too short."
    ids = []
    for s in held:
        ids += tok.encode(s.text, bos=True)
        if len(ids) >= length:
            return ids[:length]
    raise SystemExit(f"held-out stories hold fewer than {length} tokens")


@torch.inference_mode()
def top2_gap(model, prompt: list[int], tokens: list[int], i: int) -> float:
    "The gap between the two largest logits before new token i (the model's own forward)."
    logits = model(torch.tensor([prompt + tokens[:i]]))[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def check_agreement(model, prompt, outputs: dict, ref: str) -> list[str]:
    "Compare each decoder's greedy tokens with outputs[ref]; return the failures (printed)."
    failures = []
    want = outputs[ref]
    for name, got in outputs.items():
        if name == ref or got is None:
            continue
        i = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if i is None and len(got) == len(want):
            print(f"check: {name} = {ref} on all {len(want)} greedy tokens")
            continue
        i = min(len(want), len(got)) if i is None else i
        gap = top2_gap(model, prompt, want, i)
        if gap < NEAR_TIE:
            print(f"check: {name} and {ref} agree on {i} tokens, then differ at a near-tie "
                  f"(top-2 logit gap {gap:.2e} < {NEAR_TIE:g}): accepted")
        else:
            msg = (f"{name} and {ref} differ at new token {i} ({got[i] if i < len(got) else None} vs "
                   f"{want[i] if i < len(want) else None}) where the top-2 logit gap is {gap:.3g}")
            print("FAIL: " + msg)
            failures.append(msg)
    return failures


def int8_runners(ours, prompt, n):
    "The int8 decoders: generate on the quantised model, compiled if accepted, and the int8 floor."
    from tinyllama.generate import CompiledDecoder, generate
    from tinyllama.quantize import quantize_int8, quantize_rows

    q8 = quantize_int8(ours)
    runners = {"int8 (KV cache)": lambda: generate(q8, [prompt], max_new_tokens=n, temperature=0)[0]}
    try:
        cd = CompiledDecoder(q8)
    except ValueError as e:
        print(f"note: CompiledDecoder does not take the int8 model here ({str(e)[:60]}...): no int8 compiled row")
    else:
        t0 = time.perf_counter()
        cd.generate(prompt, n)
        print(f"int8 compiled: the first call compiled the step in {time.perf_counter() - t0:.1f} s (not counted)")
        runners["int8 compiled"] = lambda: cd.generate(prompt, n)
    mats = [quantize_rows(w) for blk in ours.layers for w in (
        torch.cat([blk.self_attn.q_proj.weight, blk.self_attn.k_proj.weight, blk.self_attn.v_proj.weight]),
        blk.self_attn.o_proj.weight, torch.cat([blk.mlp.gate_proj.weight, blk.mlp.up_proj.weight]),
        blk.mlp.down_proj.weight)] + [quantize_rows(ours.lm_head.weight)]
    # bf16 activations and scales: the kernel's fast code (its fp32 code is scalar, several times slower)
    mats = [(q, s.to(torch.bfloat16)) for q, s in mats]
    vecs = [torch.randn(1, q.shape[1], dtype=torch.bfloat16) for q, _ in mats]
    mm = torch.ops.aten._weight_int8pack_mm

    def run_floor():
        with torch.inference_mode():
            for _ in range(n):
                for x, (q, s) in zip(vecs, mats):
                    mm(x, q, s)
        return [0] * n

    runners["bare int8 matvecs (floor)"] = run_floor
    return q8, runners


def quality(ours, q8, tok, held, prompts_n: int = 16, n_new: int = 48) -> dict:
    "Held-out NLL / floor per precision and greedy agreement with fp32 (printed; returned)."
    from tinyllama.data import entropy_estimate
    from tinyllama.generate import generate
    from tinyllama.model import LLM
    from tinyllama.train import compare_to_floor

    bf16 = LLM(ours.config).to(torch.bfloat16).eval()
    bf16.load_state_dict(ours.state_dict())
    floor, out = entropy_estimate(2000), {}
    prompts = [tok.encode(s.text, bos=True)[:4] for s in held[:prompts_n]]
    ref = generate(ours, prompts, n_new, temperature=0)
    for name, m in [("fp32", ours), ("bf16", bf16), ("int8", q8)]:
        ratio = compare_to_floor(m, tok, held, floor).ratio
        got = ref if m is ours else generate(m, prompts, n_new, temperature=0)
        agree = 0
        for a, b in zip(ref, got):
            agree += next((j for j, (u, v) in enumerate(zip(a, b)) if u != v), len(a))
        out[name] = (ratio, agree / sum(len(a) for a in ref))
    base = out["fp32"][0]
    for name, (ratio, agree) in out.items():
        print(f"quality {name}: held-out NLL / entropy floor {ratio:.4f} ({100 * (ratio / base - 1):+.2f}% vs fp32); "
              f"greedy tokens equal to fp32 up to the first difference: {agree:.1%}")
    return out
