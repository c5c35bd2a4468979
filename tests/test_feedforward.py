"""Tests of tinyllama.feedforward (chapter 04): SwiGLU, RegularSwiGLU, the hidden-size rule, errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from tinyllama.feedforward import RegularSwiGLU, SwiGLU, llama_hidden_dim


@pytest.mark.parametrize("shape", [(16,), (3, 16), (2, 5, 16), (1, 1, 1, 16)])
def test_shapes(shape):
    ffn = SwiGLU(16, 40)
    assert ffn(torch.randn(*shape)).shape == shape
    assert RegularSwiGLU(16, 40)(torch.randn(*shape)).shape == shape[:-1] + (40,)


def test_parameters_are_llama_named_and_bias_free():
    ffn = SwiGLU(12, 32)
    shapes = {k: tuple(v.shape) for k, v in ffn.state_dict().items()}
    assert shapes == {"gate_proj.weight": (32, 12), "up_proj.weight": (32, 12), "down_proj.weight": (12, 32)}


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 24), h=st.integers(1, 48), seed=st.integers(0, 2**31 - 1))
def test_swiglu_equals_hand_written_formula(d, h, seed):
    torch.manual_seed(seed)
    ffn = SwiGLU(d, h)
    x = torch.randn(3, d)
    Wg, Wu, Wd = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    a = x @ Wg.T
    by_hand = ((a / (1 + torch.exp(-a))) * (x @ Wu.T)) @ Wd.T  # silu written out
    assert torch.allclose(ffn(x), by_hand, atol=1e-5)


def test_regular_swiglu_formula_with_biases_and_beta():
    torch.manual_seed(0)
    for beta in (0.5, 1.0, 3.0):
        reg = RegularSwiGLU(6, 9, beta=beta)
        x = torch.randn(4, 6)
        a = x @ reg.linear_gate.weight.T + reg.linear_gate.bias
        b = x @ reg.linear.weight.T + reg.linear.bias
        assert torch.allclose(reg(x), a * torch.sigmoid(beta * a) * b, atol=1e-6)
        assert reg.linear.bias.abs().sum() > 0  # the biases are really there


def test_swiglu_is_regular_swiglu_without_biases_then_down_projection():
    torch.manual_seed(1)
    ffn, reg = SwiGLU(8, 20), RegularSwiGLU(8, 20)
    with torch.no_grad():
        reg.linear_gate.weight.copy_(ffn.gate_proj.weight); reg.linear_gate.bias.zero_()
        reg.linear.weight.copy_(ffn.up_proj.weight); reg.linear.bias.zero_()
    x = torch.randn(5, 8)
    assert torch.allclose(ffn.down_proj(reg(x)), ffn(x), atol=1e-6)
    with torch.no_grad():
        reg.linear.bias.fill_(0.5)
    assert not torch.allclose(ffn.down_proj(reg(x)), ffn(x), atol=1e-3)


def test_matches_hugging_face_llama_mlp():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=44, num_attention_heads=2)
    hf = LlamaMLP(cfg)
    ours = SwiGLU(16, 44)
    ours.load_state_dict(hf.state_dict())  # same names, same shapes
    x = torch.randn(2, 3, 16)
    assert torch.allclose(ours(x), hf(x), atol=1e-6)


# Published checkpoints: (dim, multiple_of, ffn_dim_multiplier) from Meta's params.json,
# expected = intermediate_size in the Hugging Face config of the same model.
PUBLISHED = [
    ("llama-7b / llama-2-7b", 4096, 256, None, 11008),
    ("llama-13b / llama-2-13b", 5120, 256, None, 13824),
    ("llama-33b", 6656, 256, None, 17920),
    ("llama-65b", 8192, 256, None, 22016),
    ("llama-2-70b", 8192, 4096, 1.3, 28672),
    ("llama-3-8b", 4096, 1024, 1.3, 14336),
    ("llama-3-70b", 8192, 4096, 1.3, 28672),
    ("llama-3.1-405b", 16384, 4096, 1.2, 53248),
    ("llama-3.2-1b", 2048, 256, 1.5, 8192),
    ("llama-3.2-3b", 3072, 256, 1.0, 8192),
    ("tinyllama-1.1b", 2048, 256, None, 5632),
]


@pytest.mark.parametrize("name,dim,multiple_of,mult,expected", PUBLISHED)
def test_hidden_dim_matches_published_configs(name, dim, multiple_of, mult, expected):
    assert llama_hidden_dim(dim, multiple_of, mult) == expected


@settings(max_examples=100, deadline=None)
@given(dim=st.integers(1, 20000), multiple_of=st.sampled_from([1, 8, 64, 256, 1024, 4096]))
def test_hidden_dim_is_smallest_multiple_not_below_two_thirds_of_4d(dim, multiple_of):
    h = llama_hidden_dim(dim, multiple_of)
    base = (8 * dim) // 3
    assert h % multiple_of == 0
    assert base <= h < base + multiple_of


@pytest.mark.parametrize("dim", [3, 96, 768, 3072])
def test_parameter_count_equals_4d_mlp_when_no_rounding_is_needed(dim):
    # 8d/3 is an integer multiple of 8 for these d: three h*d matrices hold exactly 8 d^2 weights
    h = llama_hidden_dim(dim, multiple_of=8 if dim > 3 else 1)
    assert h == 8 * dim // 3 and 3 * h * dim == 8 * dim * dim
    with torch.device("meta"):
        swiglu = SwiGLU(dim, h)
        mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim, bias=False), torch.nn.Linear(4 * dim, dim, bias=False))
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(swiglu) == n(mlp)


def test_rounding_costs_under_one_percent_for_llama_2_7b():
    h = llama_hidden_dim(4096)
    assert 1.0 < 3 * h * 4096 / (8 * 4096**2) < 1.01


@pytest.mark.parametrize("args,match", [((0,), "dim"), ((-8,), "dim"), ((8.0,), "dim"), ((8, 0), "multiple_of"),
                                        ((8, 256, 0.0), "ffn_dim_multiplier"), ((8, 256, -1.3), "ffn_dim_multiplier")])
def test_hidden_dim_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        llama_hidden_dim(*args)


@pytest.mark.parametrize("args,match", [((0, 8), "dim"), ((8, 0), "hidden_dim"), ((8, 2.5), "hidden_dim"),
                                        ((True, 8), "dim")])
def test_swiglu_bad_construction(args, match):
    with pytest.raises(ValueError, match=match):
        SwiGLU(*args)
    with pytest.raises(ValueError):
        RegularSwiGLU(*args)


def test_wrong_input_width_is_a_clear_value_error():
    with pytest.raises(ValueError, match="last dimension is 16"):
        SwiGLU(16, 32)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="last dimension is 16"):
        RegularSwiGLU(16, 32)(torch.randn(2, 8))
