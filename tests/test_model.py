"""Tests of tinyllama.model: config validation, shapes, input errors, initialisation, parameter
counts (against transformers' own LlamaForCausalLM on the meta device), tying, KV cache, padding."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import os, sys
sys.path.insert(0, os.path.dirname(__file__))
from _models import randomized  # noqa: E402
from tinyllama.model import (LLM, LLMConfig, TransformerBlock, init_weights, model_summary, parameter_breakdown,
                             parameter_count, published_configs, INIT_STD)
from tinyllama.attention import KVCache

SMALL = dict(vocab_size=97, context_size=32, dim_emb=32, num_layers=2, num_heads=4, num_kv_heads=2, ffd_hidden_dim=48)


def small(**kw):
    return LLMConfig(**{**SMALL, **kw})


# ---------------------------------------------------------------- config

def test_default_config_is_a_working_model():
    c = LLMConfig()
    m = LLM(c)
    out = m(torch.randint(0, c.vocab_size, (1, 5)))
    assert out.shape == (1, 5, c.vocab_size)


@pytest.mark.parametrize("bad, words", [
    (dict(num_heads=5), "does not divide dim_emb"),
    (dict(num_kv_heads=3), "does not divide num_heads"),
    (dict(dim_emb=0), "positive integer"),
    (dict(vocab_size=-1), "positive integer"),
    (dict(num_layers=0), "positive integer"),
    (dict(context_size=0), "positive integer"),
    (dict(ffd_hidden_dim=0), "positive integer"),
    (dict(num_heads=0), "positive integer"),
    (dict(dim_emb=2.5), "positive integer"),
    (dict(dim_emb=True), "positive integer"),
    (dict(dim_emb=36, num_heads=4, num_kv_heads=2), "odd"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(emb_dropout=1.0), "emb_dropout"),
    (dict(emb_dropout=-0.1), "emb_dropout"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
])
def test_invalid_configs_are_refused_in_words(bad, words):
    with pytest.raises(ValueError, match=words):
        small(**bad)


def test_llm_refuses_something_that_is_not_a_config():
    with pytest.raises(ValueError, match="LLMConfig"):
        LLM(dict(SMALL))


# ---------------------------------------------------------------- shapes and inputs

@pytest.mark.parametrize("B, T", [(1, 1), (3, 7), (2, 32)])
def test_logits_shape(B, T):
    c = small()
    m = LLM(c)
    assert m(torch.randint(0, c.vocab_size, (B, T))).shape == (B, T, c.vocab_size)


def test_block_is_residual_and_keeps_shape():
    c = small()
    block = TransformerBlock(c)
    rope = LLM(c).rope
    h = torch.randn(2, 6, c.dim_emb)
    assert block(h, rope).shape == h.shape
    assert not torch.allclose(block(h, rope), h)
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    assert torch.equal(block(h, rope), h)


@pytest.mark.parametrize("make, words", [
    (lambda c: torch.randint(0, c.vocab_size, (1, c.context_size + 1)), "context_size=32"),
    (lambda c: torch.zeros(1, 0, dtype=torch.long), "empty"),
    (lambda c: torch.zeros(0, 3, dtype=torch.long), "empty"),
    (lambda c: torch.tensor([[0, c.vocab_size]]), "outside the vocabulary"),
    (lambda c: torch.tensor([[-1, 0]]), "outside the vocabulary"),
    (lambda c: torch.tensor([1, 2]), r"input_ids\[None\]"),
    (lambda c: torch.tensor([[1.0, 2.0]]), "integer"),
    (lambda c: [[1, 2]], "tensor"),
])
def test_bad_inputs_raise_valueerror(make, words):
    c = small()
    m = LLM(c)
    with pytest.raises(ValueError, match=words):
        m(make(c))


def test_context_overflow_with_start_pos_and_bad_start_pos():
    c = small()
    m = LLM(c)
    caches = m.new_kv_caches(1)
    with pytest.raises(ValueError, match="context_size"):
        m(torch.zeros(1, 4, dtype=torch.long), kv_caches=caches, start_pos=c.context_size - 2)
    with pytest.raises(ValueError, match="start_pos"):
        m(torch.zeros(1, 4, dtype=torch.long), start_pos=-1)


def test_exactly_context_size_tokens_is_fine():
    c = small()
    assert LLM(c)(torch.zeros(1, c.context_size, dtype=torch.long)).shape[1] == c.context_size


def test_mask_cache_and_position_shape_errors():
    c = small()
    m = LLM(c)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        m(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="position_ids"):
        m(ids, position_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="one cache per layer"):
        m(ids, kv_caches=m.new_kv_caches(2)[:1])
    with pytest.raises(ValueError, match="batch_size=3"):
        m(ids, kv_caches=m.new_kv_caches(3))
    for bad in (0, c.context_size + 1, 2.0):
        with pytest.raises(ValueError, match="max_seq_len"):
            m.new_kv_caches(1, bad)


# ---------------------------------------------------------------- initialisation

def test_init_statistics():
    c = LLMConfig(vocab_size=512, context_size=16, dim_emb=128, num_layers=8, num_heads=4, num_kv_heads=2,
                  ffd_hidden_dim=256)
    torch.manual_seed(0)
    m = LLM(c)
    resid = INIT_STD / math.sqrt(2 * c.num_layers)
    for name, p in m.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert abs(p.std().item() - resid) < 0.1 * resid, name
        else:
            assert abs(p.std().item() - INIT_STD) < 0.1 * INIT_STD, name
        if "norm" not in name:
            assert abs(p.mean().item()) < 0.2 * p.std().item(), name
    init_weights(m, c.num_layers, scale_residual=False)
    assert abs(m.layers[0].self_attn.o_proj.weight.std().item() - INIT_STD) < 0.1 * INIT_STD
    with pytest.raises(ValueError, match="num_layers"):
        init_weights(m, 0)


def test_initial_loss_is_near_log_vocab():
    c = LLMConfig()
    torch.manual_seed(0)
    m = LLM(c)
    ids = torch.randint(0, c.vocab_size, (4, 32))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), torch.randint(0, c.vocab_size, (128,)))
    assert abs(loss.item() - math.log(c.vocab_size)) < 0.2


# ---------------------------------------------------------------- parameter counts

def _hf_count_on_meta(cfg: LLMConfig) -> int:
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim_emb,
                                      intermediate_size=cfg.ffd_hidden_dim, num_hidden_layers=cfg.num_layers,
                                      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                      max_position_embeddings=cfg.context_size,
                                      tie_word_embeddings=cfg.tie_embeddings)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    return sum(p.numel() for p in hf.parameters())


# The totals the publishers state (Llama 2 paper / model cards, TinyLlama's model card). Each is also
# checked against transformers' own count below, so a typo here would fail rather than pass.
PUBLISHED = {"TinyLlama-1.1B": 1_100_048_384, "Llama-2-7B": 6_738_415_616,
             "Llama-3-8B": 8_030_261_248, "Llama-2-70B": 68_976_648_192}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_counts_on_meta_device(name):
    cfg = published_configs()[name]
    with torch.device("meta"):
        m = LLM(cfg)
    assert all(p.is_meta for p in m.parameters())
    ours = sum(p.numel() for p in m.parameters())
    assert ours == model_summary(m).total == parameter_count(cfg)
    assert ours == _hf_count_on_meta(cfg)
    assert ours == PUBLISHED[name]


def test_meta_model_keeps_published_feedforward_rule():
    from tinyllama.feedforward import llama_hidden_dim
    cfgs = published_configs()
    assert cfgs["Llama-2-7B"].ffd_hidden_dim == llama_hidden_dim(4096)
    assert cfgs["TinyLlama-1.1B"].ffd_hidden_dim == llama_hidden_dim(2048)
    assert cfgs["Llama-2-70B"].ffd_hidden_dim == llama_hidden_dim(8192, ffn_dim_multiplier=1.3, multiple_of=4096)
    assert cfgs["Llama-3-8B"].ffd_hidden_dim == llama_hidden_dim(4096, ffn_dim_multiplier=1.3, multiple_of=1024)


@settings(max_examples=25, deadline=None)
@given(vocab=st.integers(2, 300), heads_log=st.integers(0, 3), kv_div_log=st.integers(0, 3),
       half_head=st.integers(1, 8), layers=st.integers(1, 3), ffd=st.integers(1, 80), tied=st.booleans())
def test_formula_equals_module_count(vocab, heads_log, kv_div_log, half_head, layers, ffd, tied):
    H = 2 ** heads_log
    K = H // 2 ** min(kv_div_log, heads_log)
    cfg = LLMConfig(vocab_size=vocab, context_size=8, dim_emb=H * 2 * half_head, num_layers=layers,
                    num_heads=H, num_kv_heads=K, ffd_hidden_dim=ffd, tie_embeddings=tied)
    m = LLM(cfg)
    s = model_summary(m)
    assert s.groups == parameter_breakdown(cfg)
    assert s.total == parameter_count(cfg) == sum(p.numel() for p in m.parameters())


def test_formula_matches_transformers_on_small_gqa_configs():
    for cfg in (small(), small(tie_embeddings=True), small(num_kv_heads=1), small(num_kv_heads=4)):
        assert parameter_count(cfg) == _hf_count_on_meta(cfg)


def test_summary_size_and_dtype():
    m = LLM(small())
    s = model_summary(m)
    assert s.size_mb == pytest.approx(4 * s.total / 2**20) and s.dtype == "float32"
    s16 = model_summary(m.to(torch.bfloat16))
    assert s16.size_mb == pytest.approx(2 * s.total / 2**20) and s16.dtype == "bfloat16"
    text = str(s)
    assert f"{s.total:,}" in text and "attention" in text and "MiB" in text
    m.embed_tokens.weight.requires_grad_(False)
    assert model_summary(m).trainable == s.total - m.embed_tokens.weight.numel()


# ---------------------------------------------------------------- tied embeddings

def test_tied_embeddings_share_one_matrix():
    c = small(tie_embeddings=True)
    m = LLM(c)
    assert m.lm_head.weight is m.embed_tokens.weight
    untied = sum(p.numel() for p in LLM(small()).parameters())
    assert untied - sum(p.numel() for p in m.parameters()) == c.vocab_size * c.dim_emb
    s = model_summary(m)
    assert s.tied and s.groups["lm_head"] == 0
    # both uses send gradient into the one matrix
    m(torch.randint(0, c.vocab_size, (2, 5))).sum().backward()
    g = m.embed_tokens.weight.grad
    assert g is not None and (g.abs().sum(-1) > 0).all()  # every row gets gradient through lm_head


def test_tied_model_moves_and_stays_tied():
    m = LLM(small(tie_embeddings=True)).to(torch.float64)
    assert m.lm_head.weight is m.embed_tokens.weight


# ---------------------------------------------------------------- cache and padding

@pytest.mark.parametrize("K", [1, 2, 4])
def test_kv_cache_incremental_equals_full_forward(K):
    c = small(num_kv_heads=K)
    m = randomized(c)
    ids = torch.randint(0, c.vocab_size, (2, 14))
    with torch.no_grad():
        full = m(ids)
        caches = m.new_kv_caches(2, 14)
        parts = [m(ids[:, :6], kv_caches=caches)]
        parts.append(m(ids[:, 6:9], kv_caches=caches, start_pos=6))  # a chunk of several tokens
        for t in range(9, 14):
            parts.append(m(ids[:, t:t + 1], kv_caches=caches, start_pos=t))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert isinstance(caches[0], KVCache) and len(caches) == c.num_layers


def test_kv_cache_past_its_length_is_refused():
    c = small()
    m = LLM(c)
    caches = m.new_kv_caches(1, 4)
    m(torch.zeros(1, 4, dtype=torch.long), kv_caches=caches)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 1, dtype=torch.long), kv_caches=caches, start_pos=4)


def test_left_padded_row_equals_row_alone():
    c = small()
    m = randomized(c)
    short = torch.randint(1, c.vocab_size, (1, 5))
    long_ = torch.randint(1, c.vocab_size, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long_])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        out = m(batch, attention_mask=mask)
        torch.testing.assert_close(out[0, 4:], m(short)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], m(long_)[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
    # without the mask the padded row is different: the mask is what makes them equal
    with torch.no_grad():
        assert not torch.allclose(m(batch)[0, 4:], m(short)[0], atol=1e-3)


def test_left_padded_incremental_decoding_equals_alone():
    c = small()
    m = randomized(c)
    short = torch.randint(1, c.vocab_size, (1, 4))
    pad = 3
    batch = torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)
    batch = torch.cat([batch, torch.randint(1, c.vocab_size, (1, 7))])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    nxt = torch.randint(1, c.vocab_size, (2, 1))
    with torch.no_grad():
        caches = m.new_kv_caches(2, 8)
        m(batch, attention_mask=mask, kv_caches=caches)
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        step = m(nxt, attention_mask=mask2, kv_caches=caches, start_pos=7)
        alone = m(torch.cat([short, nxt[:1]], 1))[:, -1]
    torch.testing.assert_close(step[0], alone, atol=1e-5, rtol=1e-5)


def test_explicit_position_ids_override():
    c = small()
    m = randomized(c)
    ids = torch.randint(0, c.vocab_size, (1, 5))
    with torch.no_grad():
        shifted = m(ids, position_ids=torch.arange(3, 8)[None])
        torch.testing.assert_close(shifted, m(ids, start_pos=3))
        # RoPE is relative: shifting every position alike changes nothing (up to rounding) ...
        torch.testing.assert_close(shifted, m(ids), atol=1e-4, rtol=1e-4)
        # ... but a gap between positions does change the logits
        gapped = m(ids, position_ids=torch.tensor([[0, 1, 2, 10, 11]]))
        torch.testing.assert_close(gapped[:, :3], m(ids)[:, :3], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(gapped[:, 3:], m(ids)[:, 3:], atol=1e-3)


def test_emb_dropout_only_in_training():
    c = small(emb_dropout=0.5)
    m = LLM(c)
    ids = torch.randint(0, c.vocab_size, (2, 6))
    m.train()
    torch.manual_seed(0)
    a = m(ids)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(ids))
    m.eval()
    torch.testing.assert_close(m(ids), m(ids))


def test_state_dict_names_follow_llama_convention():
    m = LLM(small())
    names = set(m.state_dict())
    assert "embed_tokens.weight" in names and "norm.weight" in names and "lm_head.weight" in names
    for part in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert f"layers.1.{part}.weight" in names
    assert not any("rope" in n for n in names)  # RoPE tables are not saved


# ---------------------------------------------------------------- one forward, FLOPs per token

def test_eager_and_sdpa_models_give_the_same_logits():
    import dataclasses
    c = small()
    torch.manual_seed(0)
    fast = LLM(c).eval()
    slow = LLM(dataclasses.replace(c, attn_impl="eager")).eval()
    slow.load_state_dict(fast.state_dict())
    assert {l.self_attn.attn_impl for l in slow.layers} == {"eager"}
    ids = torch.randint(1, c.vocab_size, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), slow(ids), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fast(ids, attention_mask=mask), slow(ids, attention_mask=mask), atol=1e-5, rtol=1e-4)
        outs = []
        for m in (fast, slow):
            caches = m.new_kv_caches(2, 12)
            parts = [m(ids[:, :6], attention_mask=mask[:, :6], kv_caches=caches)]
            for t in range(6, 10):
                parts.append(m(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_caches=caches, start_pos=t))
            outs.append(torch.cat(parts, 1))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_unknown_attention_implementation_is_refused():
    with pytest.raises(ValueError, match="attn_impl"):
        LLMConfig(attn_impl="flash")


@pytest.mark.parametrize("tied,kv", [(False, 2), (True, 1), (False, 4)])
def test_flops_per_token_equals_pytorchs_count_of_the_eager_model(tied, kv):
    "6N + 12·L·T·d is exactly what a forward and backward pass multiplies (eager attention)."
    import dataclasses
    from torch.utils.flop_counter import FlopCounterMode
    c = dataclasses.replace(small(), tie_embeddings=tied, num_kv_heads=kv)
    B, T = 2, c.context_size
    for impl, expected in (("eager", c.flops_per_token()), ("sdpa", 6 * c.matmul_params())):
        m = LLM(dataclasses.replace(c, attn_impl=impl))
        with FlopCounterMode(display=False) as counter:
            m(torch.randint(0, c.vocab_size, (B, T))).sum().backward()
        if impl == "sdpa" and counter.get_total_flops() != expected:
            continue  # a PyTorch that counts inside the fused kernel: nothing to check here
        assert counter.get_total_flops() == expected * B * T, impl


def test_flops_per_token_formula():
    c = LLMConfig(vocab_size=100, context_size=16, dim_emb=32, num_layers=3, num_heads=4, num_kv_heads=2,
                  ffd_hidden_dim=48)
    n = 3 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48) + 100 * 32  # q,o; k,v; gate,up,down; lm_head
    assert c.matmul_params() == n
    assert c.flops_per_token() == 6 * n + 12 * 3 * 16 * 32
    assert c.flops_per_token(8) == 6 * n + 12 * 3 * 8 * 32
    assert LLMConfig(**{**c.__dict__, "tie_embeddings": True}).matmul_params() == n  # lm_head still multiplies
