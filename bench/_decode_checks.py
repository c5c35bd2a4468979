"""What makes bench/decode.py honest: trained weights, a strict greedy check, int8 decoders, quality.

- `trained_model`: the bench's model trained on the story world for a fixed number of steps (cached
  under the course's cache folder), so that greedy choices have clear margins; random weights give
  near-ties everywhere, and a near-tie can hide a real difference between two decoders.
- `check_agreement`: every decoder's greedy tokens must equal the reference's; at the first token
  where one differs, the reference model's top-2 logit gap there must be a near-tie (< NEAR_TIE),
  which is reported, or the check fails (the bench then exits non-zero).
- `int8_runners`: the int8 decoders (`tinyllama.quantize`) and the int8 bare-matvec floor.
- `torchao_runners`: the same int8 scheme through torchao's `Int8WeightOnlyConfig` (when torchao is
  installed: `pip install -e ".[bench]"`), compiled, checked against an eager step on the same kernel.
- `quality`: held-out NLL / entropy floor in fp32, bf16 and int8 (ours, and torchao's when given), and
  greedy agreement with fp32.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def check_agreement(model, prompt, outputs: dict, ref: str, gap=None) -> list[str]:
    "Compare each decoder's greedy tokens with outputs[ref]; return the failures (printed)."
    # gap(tokens, i): the reference decoder's top-2 logit gap before new token i (default: model's forward)
    gap = gap or (lambda tokens, i: top2_gap(model, prompt, tokens, i))
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
        g = gap(want, i)
        if g < NEAR_TIE:
            print(f"check: {name} and {ref} agree on {i} tokens, then differ at a near-tie "
                  f"(top-2 logit gap {g:.2e} < {NEAR_TIE:g}): accepted")
        else:
            msg = (f"{name} and {ref} differ at new token {i} ({got[i] if i < len(got) else None} vs "
                   f"{want[i] if i < len(want) else None}) where the top-2 logit gap is {g:.3g}")
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


# torchao's int8 weight-only quantisation (Int8WeightOnlyConfig: symmetric, one scale per output row,
# scale = max|row| / 127.5, q in [-128, 127]; ours: max|row| / 127, q in [-127, 127]).
TORCHAO = "torchao==0.18.0"


def _import_torchao():
    "torchao's quantize_ and Int8WeightOnlyConfig, or None (printed) when it is not installed."
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-only extensions fail to load on a CPU
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        import torchao
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        print(f"skip: torchao is not installed ({e}), so there is no torchao int8 row; "
              f"`pip install -e '.[bench]'` (or `make bench`) installs {TORCHAO}")
        return None
    print(f"torchao {torchao.__version__}: Int8WeightOnlyConfig (per-row int8 weights, float activations)")
    return quantize_, Int8WeightOnlyConfig


def _ao_quantize(module, ao):
    "Every nn.Linear under `module` quantised in place by torchao (no global inductor settings)."
    quantize_, Config = ao
    quantize_(module, Config(set_inductor_config=False))  # its settings are for GPU (triton) kernels
    return module


def _fused(*linears) -> nn.Linear:
    "One Linear whose rows are those of `linears` (per-row scales are unchanged by stacking rows)."
    w = torch.cat([lin.weight.detach() for lin in linears])
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = nn.Parameter(w.clone(), requires_grad=False)
    return lin


def _bf16_linear(lin, x):
    "A torchao Linear on bf16 activations (the dtype its CPU int8 kernel takes), result in fp32."
    return lin(x.to(torch.bfloat16)).float()


def _kernel_in(lin, x):
    "What inductor lowers a torchao int8 Linear to: the int8 weight-pack kernel on its q and scales."
    w = lin.weight  # a torchao Int8Tensor: qdata (out, in) int8, scale (out, 1)
    y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), w.qdata, w.scale.reshape(-1).to(torch.bfloat16))
    return y.float()


def _ao_step(model, lin, slots, tok, pos, ks, vs, kernel: bool = False):
    "decode_step (chapter 08) for one token with torchao Linears: (1,) token -> (1, V) logits."
    mm = _kernel_in if kernel else _bf16_linear  # kernel: the eager reference of the compiled step
    c = model.config
    H, K, D, d = c.num_heads, c.num_kv_heads, c.head_dim, c.dim_emb
    h = F.embedding(tok, model.embed_tokens.weight)  # (1, d)
    cos = model.rope.cos.index_select(0, pos)[:, None]  # (1, 1, D)
    sin = model.rope.sin.index_select(0, pos)[:, None]
    hidden = ~(slots <= pos)[None, None, None]  # (1, 1, 1, S): unwritten slots
    for (qkv, o, gu, down), b, k, v in zip(lin[0], model.layers, ks, vs):
        x = mm(qkv, b.input_layernorm(h)).view(1, H + 2 * K, D)
        qk = x[:, : H + K]
        qk = qk * cos + torch.cat([-qk[..., D // 2 :], qk[..., : D // 2]], -1) * sin
        k.index_copy_(2, pos, qk[:, H:, None])
        v.index_copy_(2, pos, x[:, H + K :, None])
        q = qk[:, :H].reshape(1, K, H // K, D) * D**-0.5
        s = (q @ k.transpose(-1, -2)).masked_fill(hidden, float("-inf"))
        h = h + mm(o, (s.softmax(-1) @ v).reshape(1, d))
        gate, up = mm(gu, b.post_attention_layernorm(h)).chunk(2, dim=-1)
        h = h + mm(down, F.silu(gate) * up)
    return mm(lin[1], model.norm(h))


class TorchaoDecoder:
    """Greedy decoding of one prompt with torchao int8 Linears: compiled, or its eager reference.

    The step is chapter 08's decode_step (q|k|v and gate|up fused, whole-context caches, a mask),
    after a prefill through LLM.forward (as CompiledDecoder); activations enter each Linear in bf16, as in
    tinyllama.quantize. Compiled (torch.compile, fixed shapes), inductor turns torchao's
    `mm(x, q.t().to(bf16)) * scales` into PyTorch's int8 weight-pack kernel. The eager reference calls
    that kernel on torchao's q and scales itself: the same arithmetic, so the greedy tokens must match.
    (torchao's own eager path is different arithmetic: it converts the int8 matrix to bf16 on every
    call and rounds the product to bf16 before scaling, so its tokens may differ at a one-bf16-unit
    gap, and it is not timed: the bench times only decoders whose tokens it can require to be equal.)
    """

    def __init__(self, ours, llm, ao, compiled: bool):  # llm: torchao_llm(ours), for the prefill
        blocks = nn.ModuleList(nn.ModuleList([
            _fused(b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj), _fused(b.self_attn.o_proj),
            _fused(b.mlp.gate_proj, b.mlp.up_proj), _fused(b.mlp.down_proj)]) for b in ours.layers)
        self.lin = _ao_quantize(nn.ModuleList([blocks, _fused(ours.lm_head)]), ao)
        self.model, c = llm.eval(), llm.config
        self.slots = torch.arange(c.context_size)
        self.pos = [torch.tensor([t]) for t in range(c.context_size)]
        self.step = torch.compile(_ao_step, fullgraph=True, dynamic=False) if compiled else _ao_eager_step
        self.compiled, self.ready = compiled, False

    def _stance(self):
        "Compile with a C++ wrapper, then skip guards (as CompiledDecoder does)."
        import contextlib
        import torch._inductor.config as inductor_config

        if not self.compiled:
            return contextlib.nullcontext()
        if self.ready:
            return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        return inductor_config.patch(cpp_wrapper=True)

    @torch.inference_mode()
    def run(self, ids: list[int], n: int, forced=()):
        "Prefill `ids` (LLM.forward), decode n tokens (greedy after `forced`): (tokens, last logits)."
        caches = self.model.new_kv_caches(1, self.model.config.context_size)
        logits = self.model(torch.tensor([ids]), kv_caches=caches)[:, -1]  # as CompiledDecoder does
        ks, vs = [c.k for c in caches], [c.v for c in caches]
        out = []
        with self._stance():
            for t in range(n):
                nxt = torch.tensor([forced[t]]) if t < len(forced) else logits.argmax(-1)
                out.append(int(nxt))
                if t == n - 1:
                    break
                logits = self.step(self.model, self.lin, self.slots, nxt, self.pos[len(ids) + t], ks, vs)
        self.ready = True
        return out, logits

    def generate(self, prompt: list[int], n: int) -> list[int]:
        "n greedy tokens after `prompt`."
        return self.run(prompt, n)[0]

    def top2_gap(self, prompt, tokens, i) -> float:
        "This decoder's top-2 logit gap before new token i (after prompt + tokens[:i])."
        top = self.run(prompt, i + 1, forced=tokens[:i])[1][0].topk(2).values  # the logits of token i
        return float(top[0] - top[1])


def _ao_eager_step(*args):
    "The compiled step's eager reference: the int8 kernel called directly."
    return _ao_step(*args, kernel=True)


class _Bf16In(nn.Module):
    "A torchao-quantised Linear that takes its input in bf16 and returns fp32: for LLM.forward."

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return _bf16_linear(self.lin, x)


def torchao_llm(ours, ao):
    "A copy of `ours` whose Linears are torchao int8 (bf16 in, fp32 out): prefill, NLL, generate."
    m = copy.deepcopy(ours).eval()
    for name, lin in [(n, x) for n, x in m.named_modules() if isinstance(x, nn.Linear)]:
        parent, _, attr = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, attr,
                _Bf16In(_ao_quantize(nn.Sequential(_fused(lin)), ao)[0]))
    return m


def torchao_runners(ours, prompt, n):
    "(LLM for quality, decoders, gap function) for torchao's int8 path, or None without torchao."
    ao = _import_torchao()
    if ao is None:
        return None
    llm = torchao_llm(ours, ao)
    eager = TorchaoDecoder(ours, llm, ao, compiled=False)
    compiled = TorchaoDecoder(ours, llm, ao, compiled=True)
    t0 = time.perf_counter()
    compiled.generate(prompt, n)
    from torch._dynamo.utils import counters

    n_mm, lowered = 4 * ours.config.num_layers + 1, counters["inductor"]["woq_matcher_count"]
    print(f"torchao int8 compiled: the first call compiled the step in {time.perf_counter() - t0:.1f} s "
          f"(not counted); inductor lowered {lowered} of its {n_mm} int8 products to the int8 kernel")
    runners = {"torchao int8, eager kernel": lambda: eager.generate(prompt, n),
               "torchao int8 compiled": lambda: compiled.generate(prompt, n)}
    return llm, runners, lambda tokens, i: eager.top2_gap(prompt, tokens, i)


def quality(ours, q8, tok, held, prompts_n: int = 16, n_new: int = 48, ao=None) -> dict:
    "Held-out NLL / floor per precision (and torchao's int8 `ao`), greedy agreement with fp32."
    from tinyllama.data import entropy_estimate
    from tinyllama.generate import generate
    from tinyllama.model import LLM
    from tinyllama.train import compare_to_floor

    bf16 = LLM(ours.config).to(torch.bfloat16).eval()
    bf16.load_state_dict(ours.state_dict())
    floor, out = entropy_estimate(2000), {}
    prompts = [tok.encode(s.text, bos=True)[:4] for s in held[:prompts_n]]
    ref = generate(ours, prompts, n_new, temperature=0)
    models = [("fp32", ours), ("bf16", bf16), ("int8", q8)] + ([("torchao int8", ao)] if ao is not None else [])
    for name, m in models:
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
