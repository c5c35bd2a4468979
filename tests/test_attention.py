"""Tests of tinyllama.attention: the explicit path equals SDPA, cache == no cache, GQA rules, padding, errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from tinyllama.attention import (GroupedQueryAttention, KVCache, attention_weights, causal_attention,
                                 causal_mask, kv_cache_bytes_per_token, position_ids_from_mask, repeat_kv)
from tinyllama.rope import RotaryPositionalEncoding

FAST = settings(max_examples=15, deadline=None)


def make_layer(dim=32, heads=4, kv_heads=2, seed=0):
    torch.manual_seed(seed)
    return GroupedQueryAttention(dim, heads, kv_heads).eval(), RotaryPositionalEncoding(dim // heads, context_size=64)


# --- the explicit formula -------------------------------------------------------------------

def naive_attention(q, k, v, allowed):
    "Loop-free reference straight from the formula, in float64, queries as the last T of S keys."
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ v.double()).float()


@FAST
@given(B=st.integers(1, 3), H=st.integers(1, 4), T=st.integers(1, 9), extra=st.integers(0, 4),
       D=st.sampled_from([1, 4, 8]), seed=st.integers(0, 2**16))
def test_causal_attention_matches_sdpa_and_formula(B, H, T, extra, D, seed):
    g = torch.Generator().manual_seed(seed)
    S = T + extra
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    full = causal_mask(T, S)
    ours = causal_attention(q, k, v)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=full), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours, naive_attention(q, k, v, full), atol=1e-5, rtol=1e-4)
    if S == T:
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-4)
    # An extra mask is and-ed with the causal mask; passing the full mask again changes nothing.
    extra_mask = torch.rand(B, 1, T, S, generator=g) > 0.4
    extra_mask[..., torch.arange(T), torch.arange(S - T, S)] = True  # each query sees itself: no empty row
    allowed = full & extra_mask
    torch.testing.assert_close(causal_attention(q, k, v, extra_mask), naive_attention(q, k, v, allowed), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(causal_attention(q, k, v, allowed), causal_attention(q, k, v, extra_mask))


def test_attention_weights_are_causal_distributions():
    q, k = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    w = attention_weights(q, k)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 6))
    assert (w.triu(1) == 0).all() and (w[..., causal_mask(6)] > 0).all()


def test_fully_masked_row_gives_zeros_like_sdpa():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    out = causal_attention(q, k, v, mask)
    assert torch.isfinite(out).all() and (out[:, :, 1] == 0).all()
    assert (out[:, :, 0] == v[:, :, 0]).all()


def test_causal_mask_offset():
    m = causal_mask(3, 7)
    assert m.shape == (3, 7)
    for i in range(3):
        assert m[i].tolist() == [j <= 4 + i for j in range(7)]
    assert torch.equal(causal_mask(5), torch.ones(5, 5, dtype=torch.bool).tril())


# --- GQA -----------------------------------------------------------------------------------

@pytest.mark.parametrize("K,n_rep", [(1, 1), (1, 4), (2, 3), (4, 2)])
def test_repeat_kv_maps_head_h_to_group_h_over_n_rep(K, n_rep):
    x = torch.randn(2, K, 5, 3)
    r = repeat_kv(x, n_rep)
    assert r.shape == (2, K * n_rep, 5, 3)
    for h in range(K * n_rep):
        assert torch.equal(r[:, h], x[:, h // n_rep])


@pytest.mark.parametrize("H,K", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_projection_shapes_follow_heads(H, K):
    dim = 8 * H
    layer = GroupedQueryAttention(dim, H, K)
    D = dim // H
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"q_proj.weight": (H * D, dim), "k_proj.weight": (K * D, dim),
                      "v_proj.weight": (K * D, dim), "o_proj.weight": (dim, H * D)}
    assert layer.n_rep == H // K and layer.head_dim == D


def tied_mha(layer):
    "MHA layer with the GQA layer's k/v heads copied into each head of their group."
    mha = GroupedQueryAttention(layer.dim, layer.num_heads, layer.num_heads).eval()
    D = layer.head_dim
    rows = torch.arange(layer.num_heads * D).view(layer.num_heads, D)
    src = (torch.arange(layer.num_heads) // layer.n_rep)[:, None] * D + torch.arange(D)
    with torch.no_grad():
        mha.q_proj.weight.copy_(layer.q_proj.weight)
        mha.o_proj.weight.copy_(layer.o_proj.weight)
        mha.k_proj.weight[rows.flatten()] = layer.k_proj.weight[src.flatten()]
        mha.v_proj.weight[rows.flatten()] = layer.v_proj.weight[src.flatten()]
    return mha


@pytest.mark.parametrize("K", [1, 2, 4])
def test_gqa_equals_mha_with_tied_kv_heads(K):
    layer, rope = make_layer(32, 4, K)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, rope), tied_mha(layer)(x, rope), atol=1e-5, rtol=1e-4)


def test_mqa_heads_share_keys_and_values():
    layer, rope = make_layer(32, 4, 1)
    assert layer.k_proj.weight.shape == (8, 32)  # one head of 8 dims, for all four query heads


def test_layer_matches_explicit_path_and_is_causal():
    layer, rope = make_layer(32, 4, 2)
    x = torch.randn(2, 9, 32)
    B, T, _ = x.shape
    with torch.no_grad():
        q = rope(layer.q_proj(x).view(B, T, 4, 8).transpose(1, 2))
        k = rope(layer.k_proj(x).view(B, T, 2, 8).transpose(1, 2))
        v = layer.v_proj(x).view(B, T, 2, 8).transpose(1, 2)
        ref = layer.o_proj(causal_attention(q, repeat_kv(k, 2), repeat_kv(v, 2)).transpose(1, 2).reshape(B, T, 32))
        y = layer(x, rope)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
        x2 = x.clone()
        x2[:, 5:] = torch.randn(2, 4, 32)
        torch.testing.assert_close(layer(x2, rope)[:, :5], y[:, :5])
        assert not torch.allclose(layer(x2, rope)[:, 5:], y[:, 5:])
        # an all-ones attention mask takes the explicit-mask path and must agree with is_causal
        torch.testing.assert_close(layer(x, rope, attention_mask=torch.ones(B, T)), y, atol=1e-5, rtol=1e-4)


def test_parameter_count_formula_on_meta_device():
    with torch.device("meta"):
        layer = GroupedQueryAttention(8192, 64, 8)
    assert sum(p.numel() for p in layer.parameters()) == 2 * 8192**2 + 2 * 8192 * 8 * 128


# --- KV cache ------------------------------------------------------------------------------

def run_chunks(layer, rope, x, chunks, cache_len=None):
    cache = KVCache(x.shape[0], layer.num_kv_heads, cache_len or x.shape[1], layer.head_dim)
    outs, pos = [], 0
    for n in chunks:
        outs.append(layer(x[:, pos:pos + n], rope, start_pos=pos, kv_cache=cache))
        pos += n
    return torch.cat(outs, 1)


@FAST
@given(T=st.integers(1, 20), data=st.data(), K=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_cache_equals_no_cache(T, data, K, seed):
    layer, rope = make_layer(32, 4, K, seed=seed % 7)
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=5))) if T > 1 else []
    chunks = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    extra = data.draw(st.integers(0, 3))  # the cache may be longer than what is written
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(run_chunks(layer, rope, x, chunks, T + extra), layer(x, rope), atol=2e-5, rtol=1e-4)


def test_prefill_then_token_by_token():
    layer, rope = make_layer(32, 4, 2)
    x = torch.randn(3, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(run_chunks(layer, rope, x, [6] + [1] * 10), layer(x, rope), atol=2e-5, rtol=1e-4)


def test_cache_update_writes_at_start_pos():
    cache = KVCache(1, 2, 5, 3)
    a, b = torch.randn(1, 2, 2, 3), torch.randn(1, 2, 1, 3)
    cache.update(a, a + 1, 0)
    k, v = cache.update(b, b + 1, 2)
    assert k.shape == (1, 2, 3, 3)
    assert torch.equal(k[:, :, :2], a) and torch.equal(k[:, :, 2:], b) and torch.equal(v[:, :, 2:], b + 1)
    assert (cache.k[:, :, 3:] == 0).all()


def test_kv_cache_bytes_match_cache_objects():
    for layers, kv, d in [(32, 32, 128), (80, 8, 128), (2, 3, 4)]:
        with torch.device("meta"):
            c = KVCache(1, kv, 10, d, dtype=torch.float16)
        assert kv_cache_bytes_per_token(layers, kv, d) * 10 == layers * c.nbytes
    assert kv_cache_bytes_per_token(80, 8, 128) * 8 == kv_cache_bytes_per_token(80, 64, 128)
    assert kv_cache_bytes_per_token(1, 1, 1, bytes_per_value=4) == 8


# --- padding -------------------------------------------------------------------------------

@FAST
@given(lengths=st.lists(st.integers(1, 8), min_size=1, max_size=3), n_new=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_left_padding_equals_rows_alone(lengths, n_new, seed):
    layer, rope = make_layer(32, 4, 2)
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    rows = [torch.randn(1, n + n_new, 32, generator=g) for n in lengths]
    x = torch.randn(B, L, 32, generator=g)  # padding embeddings are arbitrary
    am = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        x[b, L - n:] = rows[b][0, :n]
        am[b, L - n:] = 1
    pos = position_ids_from_mask(am)
    with torch.no_grad():
        y = layer(x, rope, position_ids=pos, attention_mask=am)
        assert torch.isfinite(y).all()
        for b, n in enumerate(lengths):
            torch.testing.assert_close(y[b, L - n:], layer(rows[b][:, :n], rope)[0], atol=2e-5, rtol=1e-4)
        cache = KVCache(B, 2, L + n_new, 8)
        y_cached = layer(x, rope, position_ids=pos, attention_mask=am, kv_cache=cache)
        torch.testing.assert_close(y_cached, y, atol=2e-5, rtol=1e-4)
        for step in range(n_new):
            am = torch.cat([am, torch.ones(B, 1, dtype=am.dtype)], 1)
            new_pos = pos[:, -1:] + 1
            pos = torch.cat([pos, new_pos], 1)
            x_new = torch.stack([r[:, n + step] for r, n in zip(rows, lengths)])
            y_new = layer(x_new, rope, start_pos=L + step, position_ids=new_pos, attention_mask=am, kv_cache=cache)
            assert torch.isfinite(y_new).all()
            for b, n in enumerate(lengths):
                alone = layer(rows[b][:, :n + step + 1], rope)[0, -1]
                torch.testing.assert_close(y_new[b, 0], alone, atol=2e-5, rtol=1e-4)


def test_padding_query_rows_are_finite_even_in_half_masked_batches():
    layer, rope = make_layer(32, 4, 2)
    am = torch.tensor([[0, 0, 0, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        y = layer(torch.randn(2, 4, 32), rope, position_ids=position_ids_from_mask(am), attention_mask=am)
    assert torch.isfinite(y).all()


def test_position_ids_from_mask():
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert position_ids_from_mask(am).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3], [0, 0, 0, 0]]
    assert position_ids_from_mask(am.bool()).dtype == torch.long


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    ((30, 4, 2), "must divide dim"),
    ((32, 4, 3), "must divide num_heads"),
    ((0, 4, 2), "dim must be a positive integer"),
    ((32, -4, 2), "num_heads must be a positive integer"),
    ((32, 4, 0), "num_kv_heads must be a positive integer"),
    ((32.0, 4, 2), "dim must be a positive integer"),
])
def test_layer_rejects_bad_sizes(args, words):
    with pytest.raises(ValueError, match=words):
        GroupedQueryAttention(*args)


def test_layer_rejects_bad_dropout_and_inputs():
    with pytest.raises(ValueError, match="dropout"):
        GroupedQueryAttention(32, 4, 2, dropout=1.0)
    layer, rope = make_layer()
    with pytest.raises(ValueError, match="dim=32"):
        layer(torch.randn(2, 3, 16), rope)
    with pytest.raises(ValueError, match="start_pos"):
        layer(torch.randn(2, 3, 32), rope, start_pos=-1)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        layer(torch.randn(2, 3, 32), rope, attention_mask=torch.ones(2, 4))


@pytest.mark.parametrize("args", [(0, 2, 8, 4), (1, 0, 8, 4), (1, 2, -1, 4), (1, 2, 8, 0)])
def test_cache_rejects_non_positive_sizes(args):
    with pytest.raises(ValueError, match="must be a positive integer"):
        KVCache(*args)


def test_cache_overflow_and_bad_updates():
    cache = KVCache(2, 2, 4, 8)
    cache.update(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8), 0)
    with pytest.raises(ValueError, match="max_seq_len=4"):
        cache.update(torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8), 3)
    with pytest.raises(ValueError, match="start_pos"):
        cache.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), -1)
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        cache.update(torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8), 0)
    layer, rope = make_layer(32, 4, 2)
    with pytest.raises(ValueError, match="max_seq_len=4"):
        layer(torch.randn(2, 5, 32), rope, kv_cache=cache)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="n_rep"):
        repeat_kv(torch.randn(1, 2, 3, 4), 0)
    with pytest.raises(ValueError, match="batch, kv_heads"):
        repeat_kv(torch.randn(2, 3, 4), 2)
    with pytest.raises(ValueError, match="repeat_kv"):
        causal_attention(torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="q_len"):
        causal_mask(5, 3)
    with pytest.raises(ValueError, match="num_layers"):
        kv_cache_bytes_per_token(0, 8, 128)


def test_padding_rows_finite_with_a_softmax_that_gives_nan(monkeypatch):
    "Older PyTorch returns NaN for a query that may see no key; the layer must never build such a row."
    import tinyllama.attention as attention
    real_sdpa = F.scaled_dot_product_attention

    def plain_sdpa(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0, **kwargs):  # kwargs: enable_gqa
        if attn_mask is None:
            return real_sdpa(q, k, v, is_causal=is_causal, **kwargs)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        return torch.softmax(scores.masked_fill(~attn_mask, float("-inf")), -1) @ v

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", plain_sdpa)
    layer, rope = make_layer(32, 4, 2)
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        y = layer(x, rope, position_ids=position_ids_from_mask(am), attention_mask=am)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y[0, 2:], layer(x[:1, 2:], rope)[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_sdpa_gqa_path_equals_repeat_kv_path(monkeypatch, kv_heads):
    "Without a mask the layer lets SDPA share kv heads (enable_gqa); outputs and gradients equal the repeat_kv path."
    import tinyllama.attention as attention
    layer, rope = make_layer(32, 4, kv_heads)
    x = torch.randn(2, 7, 32)
    def run():
        layer.zero_grad(set_to_none=True)
        y = layer(x, rope)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), [p.grad.clone() for p in layer.parameters()]
    y_fast, g_fast = run()
    monkeypatch.setattr(attention, "_SDPA_GQA", False)
    y_ref, g_ref = run()
    torch.testing.assert_close(y_fast, y_ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --- one choice of implementation: attend(..., impl) ---------------------------------------

def twin_layers(K, seed=0):
    "The same GQA layer twice, one computing attention with SDPA, one with causal_attention."
    fast, rope = make_layer(32, 4, K, seed=seed)
    slow = GroupedQueryAttention(32, 4, K, attn_impl="eager").eval()
    slow.load_state_dict(fast.state_dict())
    return fast, slow, rope


@pytest.mark.parametrize("K", [1, 2, 4])
def test_sdpa_and_eager_layers_agree_with_cache_and_padding(K):
    fast, slow, rope = twin_layers(K)
    assert fast.attn_impl == "sdpa" and slow.attn_impl == "eager"
    g = torch.Generator().manual_seed(K)
    x = torch.randn(3, 9, 32, generator=g, requires_grad=True)
    outs = []
    for layer in (fast, slow):  # plain causal forward, outputs and gradients
        x.grad = None
        y = layer(x, rope)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), x.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # prefill, a chunk after a cached prefix, single steps
        chunks = [4, 3, 1, 1]
        torch.testing.assert_close(run_chunks(fast, rope, x, chunks), run_chunks(slow, rope, x, chunks),
                                   atol=1e-5, rtol=1e-4)
        am = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9, [0] * 8 + [1]])
        pos = position_ids_from_mask(am)
        caches = [KVCache(3, K, 11, 8) for _ in range(2)]
        ys = [layer(x, rope, position_ids=pos, attention_mask=am, kv_cache=c) for layer, c in zip((fast, slow), caches)]
        torch.testing.assert_close(ys[0], ys[1], atol=1e-5, rtol=1e-4)
        am = torch.cat([am, torch.ones(3, 1, dtype=am.dtype)], 1)
        x_new = torch.randn(3, 1, 32, generator=g)
        ys = [layer(x_new, rope, start_pos=9, position_ids=pos[:, -1:] + 1, attention_mask=am, kv_cache=c)
              for layer, c in zip((fast, slow), caches)]
        torch.testing.assert_close(ys[0], ys[1], atol=1e-5, rtol=1e-4)


def test_eager_layer_computes_with_causal_attention(monkeypatch):
    "The teaching path is really chapter 05's causal_attention, chosen in attend."
    import tinyllama.attention as attention
    calls = []
    real = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast, slow, rope = twin_layers(2)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        fast(x, rope)
        assert calls == []
        slow(x, rope)
        assert calls == [1]


def test_attend_rejects_nothing_but_the_layer_refuses_an_unknown_implementation():
    with pytest.raises(ValueError, match="attn_impl"):
        GroupedQueryAttention(32, 4, 2, attn_impl="flash")
