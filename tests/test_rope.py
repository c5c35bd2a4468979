"""Tests of tinyllama.rope (chapter 02): relative-position property, layouts, offsets, errors."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tinyllama.rope import (RotaryPositionalEncoding, apply_rotary, apply_rotary_interleaved,
                            interleaved_to_half_permutation, rope_cos_sin, rope_frequencies, rotate_half)

head_dims = st.integers(1, 32).map(lambda n: 2 * n)


def score(q, k, m, n, theta=10000.0):
    "Dot product of q rotated to position m with k rotated to position n (q, k: (D,))."
    cq, sq = rope_cos_sin(torch.tensor([m]), q.shape[-1], theta)
    ck, sk = rope_cos_sin(torch.tensor([n]), k.shape[-1], theta)
    return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()


@settings(max_examples=60, deadline=None)
@given(d=head_dims, m=st.integers(0, 300), n=st.integers(0, 300), shift=st.integers(-300, 300),
       seed=st.integers(0, 2**31 - 1), theta=st.sampled_from([10000.0, 500000.0]))
def test_score_depends_only_on_relative_position(d, m, n, shift, seed, theta):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    m2, n2 = m + shift, n + shift
    if min(m2, n2) < 0:
        m2, n2 = m - min(m, n), n - min(m, n)  # shift so that the smaller position is 0
    tol = 1e-3 * q.norm() * k.norm()  # float32 angles at positions <= 600
    assert abs(score(q, k, m, n, theta) - score(q, k, m2, n2, theta)) <= tol
    # and it equals the closed form q^T R_{n-m} k: rotate k alone by n - m
    assert abs(score(q, k, m, n, theta) - score(q, k, 0, n - m, theta)) <= tol


@settings(max_examples=30, deadline=None)
@given(d=head_dims, start=st.integers(0, 200), T=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_module_scores_translation_invariant(d, start, T, seed):
    g = torch.Generator().manual_seed(seed)
    rope = RotaryPositionalEncoding(d, context_size=256)
    q, k = torch.randn(1, 2, T, d, generator=g), torch.randn(1, 2, T, d, generator=g)
    s0 = rope(q) @ rope(k).transpose(-1, -2)
    s1 = rope(q, start_pos=start) @ rope(k, start_pos=start).transpose(-1, -2)
    assert torch.allclose(s0, s1, atol=1e-3 * (q.norm(dim=-1).max() * k.norm(dim=-1).max()).item())


def test_relative_property_is_not_trivial():
    # Without rotation of k (or with the same angle for q and k) scores would not depend on
    # position at all; with RoPE they must change with the distance.
    q = k = torch.ones(16, dtype=torch.float64)
    assert abs(score(q, k, 0, 0) - score(q, k, 0, 5)) > 1.0


def test_frequencies_and_tables():
    d, theta = 16, 10000.0
    inv = rope_frequencies(d, theta)
    expected = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)])
    assert torch.allclose(inv, expected)
    pos = torch.tensor([[0, 3, 7], [2, 2, 9]])
    cos, sin = rope_cos_sin(pos, d)
    assert cos.shape == sin.shape == (2, 3, d) and cos.dtype == torch.float32
    assert torch.allclose(cos[..., : d // 2], cos[..., d // 2:])  # half-size angles written twice
    assert torch.allclose(cos[1, 2, 1], torch.tensor(math.cos(9 * inv[1].item())))
    assert torch.allclose(sin[0, 1, 2], torch.tensor(math.sin(3 * inv[2].item())))


def test_apply_rotary_is_a_rotation_per_pair():
    d = 8
    x = torch.randn(3, 2, 5, d, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(5), d)
    y = apply_rotary(x, cos, sin)
    assert y.dtype == x.dtype
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    h = d // 2
    pair_norm = lambda t: t[..., :h] ** 2 + t[..., h:] ** 2  # each pair (i, i+h) keeps its length
    assert torch.allclose(pair_norm(y), pair_norm(x))
    assert torch.equal(rotate_half(torch.arange(4.0)), torch.tensor([-2.0, -3.0, 0.0, 1.0]))


@settings(max_examples=30, deadline=None)
@given(d=head_dims, T=st.integers(1, 10), start=st.integers(0, 100), seed=st.integers(0, 2**31 - 1))
def test_interleaved_equals_rotate_half_up_to_permutation(d, T, start, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, T, d, generator=g)
    pos = torch.arange(start, start + T)
    perm = interleaved_to_half_permutation(d)
    assert torch.equal(perm.sort().values, torch.arange(d))
    half = apply_rotary(x[..., perm], *rope_cos_sin(pos, d))
    inter = apply_rotary_interleaved(x, pos)
    assert torch.allclose(half, inter[..., perm], atol=1e-5)
    # apply_rotary_interleaved itself against Meta's complex-number formulation
    z = torch.view_as_complex(x.double().reshape(2, 3, T, d // 2, 2).contiguous())
    angles = pos[:, None].double() * rope_frequencies(d).double()
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    assert torch.allclose(inter.double(), ref, atol=1e-4)


def test_permutation_pairs_land_on_rotate_half_pairs():
    d = 12
    perm = interleaved_to_half_permutation(d)
    where = torch.empty_like(perm)
    where[perm] = torch.arange(d)  # where[j] = new index of old dimension j
    for i in range(d // 2):
        assert (where[2 * i].item(), where[2 * i + 1].item()) == (i, i + d // 2)


def test_offset_equals_slice_of_full_rotation():
    D, T = 16, 20
    rope = RotaryPositionalEncoding(D, context_size=T)
    x = torch.randn(2, 3, T, D)
    full = rope(x)
    for start in (0, 1, 7, T - 1):
        assert torch.allclose(rope(x[:, :, start:], start_pos=start), full[:, :, start:], atol=1e-6)
    steps = torch.cat([rope(x[:, :, t:t + 1], start_pos=t) for t in range(T)], dim=2)
    assert torch.allclose(steps, full, atol=1e-6)


def test_position_ids_rows_and_broadcast():
    D, T = 8, 6
    rope = RotaryPositionalEncoding(D, context_size=32)
    x = torch.randn(3, 2, T, D)
    starts = torch.tensor([0, 4, 11])
    pos = starts[:, None] + torch.arange(T)
    y = rope(x, position_ids=pos)
    for b in range(3):
        assert torch.allclose(y[b:b + 1], rope(x[b:b + 1], start_pos=int(starts[b])), atol=1e-6)
    # a single row of positions applies to every sequence; position_ids override start_pos
    assert torch.allclose(rope(x, position_ids=pos[1:2]), rope(x, start_pos=4), atol=1e-6)
    assert torch.allclose(rope(x, start_pos=9, position_ids=pos[:1].expand(3, T)), rope(x), atol=1e-6)


def test_module_has_no_state_and_keeps_dtype():
    rope = RotaryPositionalEncoding(8, context_size=16)
    assert list(rope.parameters()) == [] and len(rope.state_dict()) == 0
    x = torch.randn(1, 1, 4, 8)
    yb = rope(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.float(), rope(x), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("kwargs", [dict(start_pos=30), dict(start_pos=29), dict(start_pos=-1)])
def test_positions_beyond_context_raise(kwargs):
    rope = RotaryPositionalEncoding(8, context_size=32)
    with pytest.raises(ValueError, match="context_size=32"):
        rope(torch.randn(1, 2, 4, 8), **kwargs)


def test_position_ids_beyond_context_raise():
    rope = RotaryPositionalEncoding(8, context_size=32)
    x = torch.randn(2, 1, 3, 8)
    with pytest.raises(ValueError, match="context_size=32"):
        rope(x, position_ids=torch.tensor([[0, 1, 2], [30, 31, 32]]))
    with pytest.raises(ValueError, match="shape"):
        rope(x, position_ids=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="integer"):
        rope(x, position_ids=torch.zeros(2, 3))


@pytest.mark.parametrize("bad", [7, 0, -4, 3.0, True])
def test_bad_head_dim_raises(bad):
    with pytest.raises(ValueError, match="even"):
        RotaryPositionalEncoding(bad, context_size=16)
    with pytest.raises(ValueError, match="even"):
        rope_frequencies(bad)


def test_bad_shapes_raise():
    rope = RotaryPositionalEncoding(8, context_size=16)
    with pytest.raises(ValueError, match="head_dim=8"):
        rope(torch.randn(1, 2, 4, 16))
    with pytest.raises(ValueError, match="head_dim=8"):
        rope(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="context_size"):
        RotaryPositionalEncoding(8, context_size=0)
    with pytest.raises(ValueError, match="last dimension"):
        apply_rotary(torch.randn(1, 1, 2, 8), *rope_cos_sin(torch.arange(2), 4))


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_matches_hugging_face(theta):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    B, H, T, D = 2, 4, 7, 16
    cfg = transformers.LlamaConfig(hidden_size=H * D, num_attention_heads=H, max_position_embeddings=64,
                                   rope_theta=theta)
    hf = LlamaRotaryEmbedding(cfg)
    q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 2, 3]])
    cos, sin = hf(q, position_ids)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    ours = RotaryPositionalEncoding(D, context_size=64, theta=theta)
    assert torch.allclose(ours(q, position_ids=position_ids), q_hf, atol=1e-5)
    assert torch.allclose(ours(k, position_ids=position_ids), k_hf, atol=1e-5)
