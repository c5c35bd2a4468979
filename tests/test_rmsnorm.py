"""Tests of tinyllama.rmsnorm (chapter 03): invariances, parity with PyTorch and Hugging Face, dtypes, errors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tinyllama.rmsnorm import RMSNorm

seeds = st.integers(0, 2**31 - 1)


def random_norm(d, eps=1e-5, seed=0):
    norm = RMSNorm(d, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=torch.Generator().manual_seed(seed)))
    return norm


@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 96), c=st.floats(1e-3, 1e4), seed=seeds)
def test_scale_invariance_exact_without_eps(d, c, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, d, generator=g, dtype=torch.float64) + 0.1  # no all-zero rows
    norm = random_norm(d, eps=0.0, seed=seed).double()
    assert torch.allclose(norm(c * x), norm(x), atol=1e-5, rtol=1e-5)
    assert torch.allclose(norm(-c * x), -norm(x), atol=1e-5, rtol=1e-5)  # negative scale flips the sign


@settings(max_examples=40, deadline=None)
@given(d=st.integers(4, 96), c=st.floats(1.0, 1e4), seed=seeds)
def test_scale_invariance_with_default_eps(d, c, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, d, generator=g)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # RMS 1, so eps = 1e-5 is negligible
    norm = random_norm(d, seed=seed)
    assert torch.allclose(norm(c * x), norm(x), atol=1e-4, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 96), scale=st.floats(1e-2, 1e3), seed=seeds)
def test_unit_gain_gives_unit_rms(d, scale, seed):
    x = scale * torch.randn(5, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = RMSNorm(d, eps=0.0).double()(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(5, dtype=torch.float64), atol=1e-5)


def test_not_shift_invariant_unlike_layernorm():
    d = 32
    x = torch.randn(8, d)
    norm = RMSNorm(d)
    ln = torch.nn.LayerNorm(d, elementwise_affine=False)
    assert torch.allclose(ln(x + 3.0), ln(x), atol=1e-4)
    assert (norm(x + 3.0) - norm(x)).abs().max() > 0.5


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 0.1])
@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 5, 7)])
def test_matches_torch_rmsnorm(eps, shape):
    ours = random_norm(7, eps=eps, seed=1)
    ref = torch.nn.RMSNorm(7, eps=eps)
    with torch.no_grad():
        ref.weight.copy_(ours.weight)
    x = 3 * torch.randn(*shape)
    assert torch.allclose(ours(x), ref(x), atol=1e-6, rtol=1e-5)
    # and the formula with the square (an implementation without it could not match)
    formula = ours.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    assert torch.allclose(ours(x), formula, atol=1e-6, rtol=1e-5)


def test_gradients_match_torch_rmsnorm():
    ours, ref = random_norm(16, seed=2), torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(ours.weight)
    x1 = torch.randn(4, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    u = torch.randn(4, 16)
    (ours(x1) * u).sum().backward()
    (ref(x2) * u).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    assert torch.allclose(ours.weight.grad, ref.weight.grad, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_output_has_input_dtype(dtype):
    norm = random_norm(64)
    x = 4 * torch.randn(3, 64)
    y = norm(x.to(dtype))
    assert y.dtype == dtype
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-6}[dtype]
    assert torch.allclose(y.double(), norm(x.to(dtype).float()).double(), atol=tol * 10, rtol=tol)
    # a model cast to the low precision gives the same dtype too
    assert norm.to(dtype)(x.to(dtype)).dtype == dtype


def test_bf16_is_normalised_in_float32_then_rounded_once():
    # The contract: compute in float32, cast back, then apply the gain. With a unit gain the
    # bf16 result is therefore exactly the float32 result rounded to bf16.
    d = 4096
    x = (torch.randn(2, d) * 3).to(torch.bfloat16)
    norm = RMSNorm(d)
    assert torch.equal(norm(x), norm(x.float()).to(torch.bfloat16))


def test_matches_hugging_face_llama_rmsnorm():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    ours = random_norm(32, eps=1e-6, seed=3)
    hf = LlamaRMSNorm(32, eps=1e-6)
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 32)
    assert torch.allclose(ours(x), hf(x), atol=1e-6)
    ours_b, hf_b = ours.to(torch.bfloat16), hf.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    assert torch.equal(ours_b(xb), hf_b(xb))


def test_state_dict_is_llama_shaped():
    sd = RMSNorm(10).state_dict()
    assert list(sd) == ["weight"] and torch.equal(sd["weight"], torch.ones(10))


def test_dim_mismatch_is_a_clear_value_error():
    norm = RMSNorm(16)
    with pytest.raises(ValueError, match=r"RMSNorm\(dim=16\).*last dimension must be 16"):
        norm(torch.randn(2, 8))
    with pytest.raises(ValueError, match="last dimension"):
        norm(torch.tensor(1.0))


@pytest.mark.parametrize("kwargs,match", [(dict(dim=0), "positive integer"), (dict(dim=-3), "positive integer"),
                                          (dict(dim=2.0), "positive integer"), (dict(dim=4, eps=-1e-5), "eps")])
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RMSNorm(**kwargs)


def test_integer_input_raises():
    with pytest.raises(ValueError, match="floating-point"):
        RMSNorm(4)(torch.arange(8).view(2, 4))
