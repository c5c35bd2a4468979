"""Weight-only int8 (tinyllama.quantize): error bound, agreement on a trained model, bad inputs."""
import pytest
import torch
import torch.nn as nn

from tinyllama.generate import generate
from tinyllama.model import LLM, LLMConfig
from tinyllama.quantize import (
    Int8Linear,
    decode_bytes_per_token,
    dequantize_rows,
    int8_linear,
    int8_step_weights,
    is_int8_layer,
    is_quantized,
    quantize_int8,
    quantize_rows,
    weight_bytes_per_token,
)
from tinyllama.train import NextTokenPredictionDataset, TrainingConfig, train

SHAPE = dict(vocab_size=48, context_size=64, dim_emb=48, num_layers=2, num_heads=4, num_kv_heads=2,
             ffd_hidden_dim=96)


@pytest.fixture(scope="module")
def trained():
    "A small LLM trained on a counter that steps by 1 (80%) or 2: clear greedy margins."
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    stream = torch.cumsum(1 + (torch.rand(6000, generator=g) < 0.2).long(), 0) % 48
    model = LLM(LLMConfig(**SHAPE))
    cfg = TrainingConfig(steps=80, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_every=0,
                         log_every=10, precision="fp32", device="cpu", seed=0)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        train(model, NextTokenPredictionDataset(stream, context_size=32, seed=1), cfg, progress=False)
    return model.eval()


def test_rounding_error_is_at_most_half_a_scale_per_row():
    w = torch.randn(64, 96) * torch.linspace(0.01, 3, 64)[:, None]
    w[3, 7] = 40.0  # an outlier: its row's scale grows, the other rows' do not
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    err = (w - dequantize_rows(q, s)).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-5)).all())
    assert torch.allclose(s, w.abs().amax(1) / 127)
    assert int(q.abs().max()) == 127 and float(s[3]) == pytest.approx(40 / 127)
    q0, s0 = quantize_rows(torch.zeros(2, 5))  # an all-zero row: exact zeros, no division by 0
    assert bool((dequantize_rows(q0, s0) == 0).all())


def test_int8_kernel_matches_the_dequantised_product():
    q7, s7 = quantize_rows(torch.randn(33, 17))  # 17 inputs: not the kernel's shape, the fallback
    x7 = torch.randn(5, 17)
    assert torch.allclose(int8_linear(x7, q7, s7), x7 @ dequantize_rows(q7, s7).T, atol=1e-5)
    w, x = torch.randn(33, 48), torch.randn(5, 48)
    q, s = quantize_rows(w)
    ref = x @ dequantize_rows(q, s).T
    # the CPU kernel runs in bf16: activations, scales and output rounded to 8 significant bits
    assert float((int8_linear(x, q, s) - ref).abs().max()) <= 1e-2 * float(ref.abs().max())
    assert int8_linear(x, q, s).dtype == torch.float32
    assert torch.allclose(int8_linear(x.double(), q, s), ref.double(), atol=1e-5)  # the fallback
    lin = nn.Linear(48, 33, bias=True)
    layer = Int8Linear.from_linear(lin)
    want = (x @ layer.dequantize().T + lin.bias).detach()
    assert float((layer(x) - want).abs().max()) <= 1e-2 * float(want.abs().max())


def test_quantize_int8_copies_by_default_and_replaces_every_linear(trained):
    q8 = quantize_int8(trained)
    assert q8 is not trained and not is_quantized(trained) and is_quantized(q8)
    assert not any(type(m) is nn.Linear for m in q8.modules())
    n_lin = sum(isinstance(m, nn.Linear) for m in trained.modules())
    assert sum(isinstance(m, Int8Linear) for m in q8.modules()) == n_lin
    # int8 weights: about a quarter of the bytes a step reads
    assert weight_bytes_per_token(q8) < 0.3 * weight_bytes_per_token(trained)
    c = trained.config
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
    assert decode_bytes_per_token(q8, 10) == weight_bytes_per_token(q8) + 10 * kv
    same = LLM(LLMConfig(**SHAPE))
    assert quantize_int8(same, inplace=True) is same and is_quantized(same)


def test_int8_greedy_tokens_agree_with_fp32_on_a_trained_model(trained):
    q8 = quantize_int8(trained)
    prompts = [[5, 6, 8, 9], [20, 21, 22], [40, 42, 43, 44, 45]]
    ref = generate(trained, prompts, 40, temperature=0)
    assert generate(q8, prompts, 40, temperature=0) == ref
    # the cache-free path (the model's own forward) agrees too
    assert generate(q8, prompts[:1], 20, temperature=0, use_cache=False)[0] == ref[0][:20]
    x = torch.tensor([ref[0][:30]])
    with torch.no_grad():
        gap = (trained(x) - q8(x)).abs().max()
    assert float(gap) < 0.05


def test_bad_inputs_are_clear_errors(trained):
    q8 = quantize_int8(trained)
    with pytest.raises(ValueError, match="quantised already"):
        quantize_int8(q8)
    with pytest.raises(ValueError, match="already an Int8Linear"):
        Int8Linear.from_linear(q8.lm_head)
    with pytest.raises(TypeError, match="takes an nn.Linear, got Embedding"):
        Int8Linear.from_linear(trained.embed_tokens)
    with pytest.raises(TypeError, match="takes a tinyllama LLM, got Sequential"):
        quantize_int8(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="2-D float weight"):
        quantize_rows(torch.ones(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_rows(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.slow
def test_compiled_decoder_and_the_fast_step_decode_the_int8_model(trained):
    from tinyllama.generate import CompiledDecoder, decode_steps

    q8 = quantize_int8(trained)
    prompt = [5, 6, 8, 9]
    fast = generate(q8, [prompt], 30, temperature=0)[0]  # decode_step on int8 weights
    slow = [int(t[0]) for t, _ in decode_steps(q8, [prompt], 30, temperature=0, fast=False)]
    assert fast == slow
    assert CompiledDecoder(q8).generate(prompt, 30) == fast
    # three steps per compiled call: lengths that are not a multiple of 3, up to the context's end
    dec = CompiledDecoder(q8, steps_per_call=3)
    for n in (1, 2, 3, 7, None):
        assert dec.generate(prompt, n) == generate(q8, [prompt], n, temperature=0)[0], n
    eos = fast[4]
    assert dec.generate(prompt, 30, eos_id=eos) == fast[: fast.index(eos) + 1]  # stops, keeps EOS
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="steps_per_call"):
            CompiledDecoder(q8, steps_per_call=bad)


def test_the_fused_int8_step_gives_the_unfused_layers_logits(trained):
    "decode_step on int8_step_weights (q|k|v and gate|up stacked, 1/sqrt(D) in the scales)."
    import importlib

    gen = importlib.import_module("tinyllama.generate")
    q8 = quantize_int8(trained)
    blocks, head = int8_step_weights(q8)
    assert len(blocks) == 2 and len(blocks[0]) == 4  # four products per block, then the head
    assert blocks[0][0].q.shape[0] == 48 + 2 * 24  # q (4 heads) and k, v (2 heads) of 12 each
    ids = [5, 6, 8, 9, 10, 11, 13, 14]
    with torch.inference_mode():
        want = q8(torch.tensor([ids]))[0]  # (T, V): every Int8Linear on its own
        caches = q8.new_kv_caches(1, len(ids))
        q8(torch.tensor([ids[:1]]), kv_caches=caches)
        for t in range(1, len(ids)):
            at = torch.tensor([t])
            ks = [c.k[:, :, : t + 1] for c in caches]
            vs = [c.v[:, :, : t + 1] for c in caches]
            got = gen.decode_step(q8, (blocks, head), torch.tensor([ids[t]]), at, at, ks, vs)[0]
            # the same int8 products, in bf16: rounding apart, the same logits
            err, scale = float((got - want[t]).abs().max()), float(want[t].abs().max())
            assert err <= 1e-2 * scale, (t, err, scale)
            assert int(got.argmax()) == int(want[t].argmax())


class LookAlike(nn.Module):
    "An int8 layer that is not an Int8Linear: the same two buffers, its own class."

    def __init__(self, lin):
        super().__init__()
        q, s = quantize_rows(lin.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", s)
        self.bias = None

    def forward(self, x):
        return int8_linear(x, self.qweight, self.scales)


def _look_alike_model(trained):
    import copy

    model = copy.deepcopy(trained)
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, LookAlike(lin))
    return model


def test_int8_layers_are_recognised_by_what_they_carry_not_their_class(trained, monkeypatch):
    import importlib

    gen = importlib.import_module("tinyllama.generate")
    look = _look_alike_model(trained)
    assert is_int8_layer(look.lm_head) and not isinstance(look.lm_head, Int8Linear)
    assert not is_int8_layer(trained.lm_head) and not is_int8_layer(trained.embed_tokens)
    assert is_quantized(look)
    prompts = [[5, 6, 8, 9], [20, 21, 22]]
    calls = []
    real = gen.decode_step
    monkeypatch.setattr(gen, "decode_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = generate(look, prompts, 12, temperature=0)
    assert len(calls) == 11  # the int8 fast step, not LLM.forward
    assert got == generate(quantize_int8(trained), prompts, 12, temperature=0)
    with pytest.raises(ValueError, match="quantised already"):
        quantize_int8(look)
    with pytest.raises(ValueError, match="already an Int8Linear"):
        Int8Linear.from_linear(look.lm_head)


def test_a_partly_quantised_model_decodes_through_its_forward(trained):
    "Int8 head, float blocks: not the int8 step (it reads every projection as int8)."
    import copy

    part = copy.deepcopy(trained)
    part.lm_head = Int8Linear.from_linear(part.lm_head)
    prompts = [[5, 6, 8, 9]]
    from tinyllama.generate import decode_steps

    want = [int(t[0]) for t, _ in decode_steps(part, prompts, 10, temperature=0, fast=False)]
    assert generate(part, prompts, 10, temperature=0)[0] == want


@pytest.mark.slow
def test_cli_sample_and_chat_take_int8(tmp_path, capsys):
    from tinyllama.cli import _int8_if, build_parser, main

    out = tmp_path / "ckpt"
    assert main(["pretrain", "--profile", "ci", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    argv = ["sample", str(out), "--profile", "ci", "--int8", "--max-new-tokens", "6", "--prompt", "Tom"]
    assert main(argv) == 0
    assert "Tom" in capsys.readouterr().out
    args = build_parser().parse_args(["chat", "--checkpoint", str(out), "--int8"])
    assert args.int8 and is_quantized(_int8_if(args, LLM(LLMConfig(**SHAPE))))
    plain = build_parser().parse_args(["chat", "--checkpoint", str(out)])
    assert not is_quantized(_int8_if(plain, LLM(LLMConfig(**SHAPE))))


def _bench_checks(monkeypatch):
    "bench/_decode_checks.py, imported as bench/decode.py imports it."
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import _decode_checks

    return _decode_checks


def test_the_decode_bench_skips_torchao_with_a_clear_line(monkeypatch, capsys):
    checks = _bench_checks(monkeypatch)
    monkeypatch.setitem(__import__("sys").modules, "torchao", None)  # as if it were not installed
    assert checks.torchao_runners(None, [1, 2], 4) is None
    out = capsys.readouterr().out
    assert "torchao is not installed" in out and "[bench]" in out


def test_the_decode_bench_fails_a_disagreement_unless_the_reference_calls_it_a_tie(monkeypatch, capsys):
    checks = _bench_checks(monkeypatch)
    outs = {"ref": [1, 2, 3, 4], "same": [1, 2, 3, 4], "other": [1, 2, 9, 9]}
    assert checks.check_agreement(None, [0], outs, "ref", gap=lambda t, i: 0.5) == [
        "other and ref differ at new token 2 (9 vs 3) where the top-2 logit gap is 0.5"]
    assert checks.check_agreement(None, [0], outs, "ref", gap=lambda t, i: 0.0) == []
    assert "near-tie" in capsys.readouterr().out
