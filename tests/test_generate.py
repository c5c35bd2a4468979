"""tinyllama.generate: filters on hand-made logits, sampling, padded batches == rows alone, cache == no cache,
EOS stopping, streaming, text helpers, and the errors for bad input."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tinyllama.model import LLM, LLMConfig
from tinyllama.generate import (apply_temperature, decode_steps, generate, generate_text, left_pad,
                                sample_from_probs, sample_next, stream, stream_text, top_k_filter, top_p_filter)

NEG = float("-inf")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LLM(LLMConfig(vocab_size=48, context_size=40, dim_emb=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffd_hidden_dim=64))
    with torch.no_grad():  # larger weights than the default init: peaked, varied next-token distributions
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return m.eval()


PROMPTS = [[1, 5, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1], [3, 3]]


# ------------------------------------------------------------------ filters on hand-made logits
def kept(logits):
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_k_keeps_the_k_largest():
    z = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])
    assert kept(top_k_filter(z, 1)) == {1}
    assert kept(top_k_filter(z, 2)) == {1, 2}
    assert kept(top_k_filter(z, 3)) == {0, 1, 2}
    assert kept(top_k_filter(z, 5)) == kept(top_k_filter(z, 99)) == {0, 1, 2, 3, 4}
    out = top_k_filter(z, 2)
    assert out[1] == 3.0 and out[2] == 2.0  # the kept logits are unchanged


def test_top_k_keeps_ties_with_the_kth():
    z = torch.tensor([[2.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    out = top_k_filter(z, 1)
    assert kept(out[0]) == {0, 2}  # both tied maxima stay (as documented)
    assert kept(out[1]) == {3}  # rows are filtered independently


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    z = probs.log()
    assert kept(top_p_filter(z, 0.4)) == {0}  # 0.5 >= 0.4 already
    assert kept(top_p_filter(z, 0.6)) == {0, 1}  # 0.5 < 0.6 <= 0.75
    assert kept(top_p_filter(z, 0.8)) == {0, 1, 2}  # ties: the lower id ranks first
    assert kept(top_p_filter(z, 0.9)) == {0, 1, 2, 3}
    assert kept(top_p_filter(z, 1.0)) == {0, 1, 2, 3}
    perm = torch.tensor([2, 0, 3, 1])  # the same distribution in another vocabulary order
    assert kept(top_p_filter(z[perm], 0.6)) == {1, 3}


def test_top_p_renormalised_probabilities():
    z = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    p = torch.softmax(top_p_filter(z, 0.6), -1)
    assert torch.allclose(p, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]), atol=1e-6)


def reference_top_p(probs, p):
    "The definition, by a loop: walk the tokens from most to least likely until the mass reaches p."
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    keep, mass = set(), 0.0
    for i in order:
        if mass >= p:
            break
        keep.add(i)
        mass += probs[i]
    return keep


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-6, 6), min_size=2, max_size=12), st.floats(0.01, 1.0))
def test_top_p_matches_its_definition(values, p):
    z = torch.tensor(values, dtype=torch.float64)
    probs = torch.softmax(z, -1).tolist()
    ref = reference_top_p(probs, p)
    # skip draws where the nucleus boundary is within rounding of p (either answer would be right)
    cums = sorted(probs, reverse=True)
    partial = [sum(cums[:i]) for i in range(1, len(cums) + 1)]
    if any(abs(s - p) < 1e-9 for s in partial):
        return
    assert kept(top_p_filter(z, p)) == ref


def test_temperature_scaling():
    z = torch.tensor([2.0, 1.0, 0.0, -1.0])
    p = torch.softmax(z, -1)
    for tau in (0.5, 1.0, 2.0):
        q = torch.softmax(apply_temperature(z, tau), -1)
        expected = p ** (1 / tau) / (p ** (1 / tau)).sum()  # softmax(z/τ) ∝ p^(1/τ)
        assert torch.allclose(q, expected, atol=1e-6)
    assert torch.equal(sample_next(z[None].repeat(3, 1), temperature=0), torch.tensor([0, 0, 0]))
    g = torch.Generator().manual_seed(0)
    cold = sample_next(z[None].repeat(200, 1), temperature=0.05, generator=g)
    assert (cold == 0).all()  # exp(-1/0.05) ≈ 2e-9 for the runner-up


def test_inverse_cdf_sampling():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.8, 0.0]])
    pick = lambda u: int(sample_from_probs(probs, torch.tensor([u]))[0])
    assert pick(0.0) == 1 and pick(0.1999) == 1 and pick(0.2001) == 3
    assert pick(1 - 1e-16) == 3  # never a zero-probability token, even at the very top
    # frequencies of many draws follow the distribution
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0])
    g = torch.Generator().manual_seed(1)
    draws = sample_next(logits[None].repeat(20000, 1), generator=g)
    freq = torch.bincount(draws, minlength=4).double() / 20000
    assert torch.allclose(freq, torch.softmax(logits.double(), -1), atol=0.015)
    # top-k and top-p restrict what is drawn
    draws = sample_next(logits[None].repeat(2000, 1), top_k=2, generator=g)
    assert set(draws.tolist()) == {0, 3}
    draws = sample_next(logits[None].repeat(2000, 1), top_p=0.5, generator=g)
    assert set(draws.tolist()) == {3}


# ------------------------------------------------------------------ padded batches, cache, EOS
def alone(model, prompts, seed, **kw):
    return [generate(model, [p], seed=None if seed is None else seed + i, **kw)[0] for i, p in enumerate(prompts)]


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.8, top_k=5),
                                dict(temperature=1.2, top_p=0.9)])
def test_padded_row_equals_row_alone(model, kw):
    batch = generate(model, PROMPTS, max_new_tokens=20, seed=7, **kw)
    assert batch == alone(model, PROMPTS, 7, max_new_tokens=20, **kw)
    assert [len(r) for r in batch] == [20] * len(PROMPTS)


def test_explicit_seed_list(model):
    a = generate(model, PROMPTS, 15, seed=[11, 12, 13, 14])
    assert a == generate(model, PROMPTS, 15, seed=11)  # row i uses seed + i
    assert generate(model, [PROMPTS[2]], 15, seed=[13]) == [a[2]]


def test_sampling_differs_between_seeds(model):
    # guards the tests above: sampling is really random, so equal rows are not trivial
    outs = {tuple(generate(model, [PROMPTS[0]], 20, seed=s)[0]) for s in range(5)}
    assert len(outs) > 1


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, top_k=8)])
def test_cache_equals_no_cache(model, kw):
    assert generate(model, PROMPTS, 25, seed=3, **kw) == generate(model, PROMPTS, 25, seed=3, use_cache=False, **kw)


def test_lean_step_equals_model_forward(model):
    from tinyllama.generate import _lean_ok
    assert _lean_ok(model)  # so that the comparison below really compares two code paths
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=5)):
        fast = [[int(t) for t in step[0]] for step in decode_steps(model, PROMPTS, 20, **kw)]
        slow = [[int(t) for t in step[0]] for step in decode_steps(model, PROMPTS, 20, fast=False, **kw)]
        assert fast == slow


def test_hooked_model_takes_the_forward_path(model):
    from tinyllama.generate import _lean_ok
    calls = []
    h = model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        assert not _lean_ok(model)
        out = generate(model, PROMPTS, 6, temperature=0)
        assert len(calls) == 6  # prefill + 5 cached steps, all through forward (so the hook ran)
    finally:
        h.remove()
    assert out == generate(model, PROMPTS, 6, temperature=0)


def test_eos_stops_a_row_and_pads_it(model):
    free = generate(model, PROMPTS, 20, temperature=0)
    eos = free[0][5]  # a token row 0 emits at step 5 (maybe earlier too)
    first = free[0].index(eos)
    out = generate(model, PROMPTS, 20, temperature=0, eos_id=eos)
    assert out[0] == free[0][:first + 1]  # stops at the first eos, which is kept as the last token
    for row_free, row in zip(free, out):
        cut = row_free.index(eos) + 1 if eos in row_free else len(row_free)
        assert row == row_free[:cut]  # other rows are unaffected
    pad = 0
    for tokens, active in decode_steps(model, PROMPTS, 20, temperature=0, eos_id=eos, pad_id=pad):
        assert (tokens[~active] == pad).all()  # finished rows are fed padding
    assert not any(eos in r[:-1] for r in out)


def test_all_rows_finished_stops_early(model):
    free = generate(model, [PROMPTS[0]], 10, temperature=0)
    steps = list(decode_steps(model, [PROMPTS[0]], 10, temperature=0, eos_id=free[0][0]))
    assert len(steps) == 1


def test_stream_yields_generate_tokens(model):
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=0.8, seed=9)):
        assert list(stream(model, PROMPTS[1], 20, **kw)) == generate(model, [PROMPTS[1]], 20, **kw)[0]
    free = generate(model, [PROMPTS[0]], 20, temperature=0)[0]
    assert list(stream(model, PROMPTS[0], 20, temperature=0, eos_id=free[3])) == free[:free.index(free[3]) + 1]


def test_global_rng_when_no_seed(model):
    torch.manual_seed(123); a = generate(model, PROMPTS, 10)
    torch.manual_seed(123); b = generate(model, PROMPTS, 10)
    assert a == b


def test_fills_the_context_exactly(model):
    c = model.config.context_size
    out = generate(model, [[1] * 10], max_new_tokens=None, temperature=0)
    assert len(out[0]) == c - 10
    assert len(generate(model, [[1] * 10, [1]], max_new_tokens=c - 10, temperature=0)[1]) == c - 10


def test_training_mode_is_restored(model):
    model.train()
    try:
        generate(model, PROMPTS, 3)
        assert model.training
    finally:
        model.eval()


def test_left_pad():
    ids, mask = left_pad([[5, 6], [7]], pad_id=9)
    assert ids.tolist() == [[5, 6], [9, 7]] and mask.tolist() == [[1, 1], [0, 1]]


# ------------------------------------------------------------------ text helpers
@pytest.fixture(scope="module")
def tokenizer():
    from tinyllama.data import story_corpus
    from tinyllama.tokenizer import train_tokenizer
    return train_tokenizer(story_corpus(200, seed=0), vocab_size=400)


def test_generate_text_and_stream_text(tokenizer):
    torch.manual_seed(0)
    m = LLM(LLMConfig(vocab_size=tokenizer.vocab_size, context_size=64, dim_emb=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, ffd_hidden_dim=64))
    prompts = ["Once upon a time", ""]
    texts = generate_text(m, tokenizer, prompts, max_new_tokens=12, seed=0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    new = generate(m, ids, 12, seed=0, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    for p, i, n, t in zip(prompts, ids, new, texts):
        assert tokenizer.decode(i + n) == p + t  # the continuation follows the prompt exactly
    assert "".join(stream_text(m, tokenizer, prompts[0], max_new_tokens=12, seed=0)) == texts[0]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("prompts, kwargs, words", [
    ([], {}, "prompts is empty"),
    ([[]], {}, "prompt 0 is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ("hello", {}, "generate_text"),
    ([1, 2, 3], {}, "wrap it in a list"),
    ([[1, 99]], {}, "outside the vocabulary"),
    ([[1] * 40], {}, "context_size=40"),
    ([[1] * 30], dict(max_new_tokens=20), "would need 50 positions"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens"),
    ([[1]], dict(temperature=-0.5), "temperature"),
    ([[1]], dict(temperature=float("nan")), "temperature"),
    ([[1]], dict(top_k=0), "top_k"),
    ([[1]], dict(top_p=0.0), "top_p"),
    ([[1]], dict(top_p=1.5), "top_p"),
    ([[1]], dict(eos_id=48), "eos_id"),
    ([[1]], dict(pad_id=-1), "pad_id"),
    ([[1], [2]], dict(seed=[1]), "seeds for 2 prompts"),
    ([[1]], dict(seed="x"), "seed"),
])
def test_bad_input(model, prompts, kwargs, words):
    with pytest.raises(ValueError, match=words):
        generate(model, prompts, **{"max_new_tokens": 5, **kwargs})


def test_bad_input_is_reported_before_any_token(model):
    with pytest.raises(ValueError, match="one prompt"):
        stream(model, [[1, 2]])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        stream(model, [])  # raised by the call itself, not on the first next()
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(torch.zeros(3), 0)
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(torch.zeros(3), -1)
    with pytest.raises(ValueError, match="greedy"):
        apply_temperature(torch.zeros(3), 0)
    with pytest.raises(ValueError, match="batch, vocab"):
        sample_next(torch.zeros(3))


# ------------------------------------------------------------------ the compiled decoder
@pytest.mark.slow
def test_compiled_decoder_gives_generates_tokens(model):
    "The first call compiles (guards on); later calls skip the guard checks; every call matches generate."
    from tinyllama.generate import CompiledDecoder
    fast = CompiledDecoder(model)
    assert not fast.compiled
    for i, prompt in enumerate(PROMPTS + [[1, 9, 9, 9, 2]]):
        n = 30 - len(prompt)  # a different length each time: the fixed-shape step must not care
        assert fast.generate(prompt, n) == generate(model, [prompt], n, temperature=0)[0], prompt
        assert fast.compiled  # from the first call on
    ref = generate(model, [PROMPTS[1]], 25, temperature=0)[0]
    eos = ref[6]
    stop = ref.index(eos) + 1
    assert fast.generate(PROMPTS[1], 25, eos_id=eos) == ref[:stop]  # stops after emitting EOS, which it keeps
    assert fast.generate(torch.tensor(PROMPTS[0]), None) == generate(model, [PROMPTS[0]], None, temperature=0)[0]
    with pytest.raises(ValueError, match="one prompt"): fast.generate(PROMPTS, 5)
    with pytest.raises(ValueError, match="context_size"): fast.generate(PROMPTS[1], 35)
    other = LLM(model.config)  # a second decoder of the same shape, other weights: each must run its own step
    with torch.no_grad():
        for w in other.parameters():
            if w.dim() > 1: w.normal_(0, 0.3)
    other_fast = CompiledDecoder(other.eval())
    for prompt in PROMPTS[:2] * 2:  # alternate, after both have compiled
        assert other_fast.generate(prompt, 20) == generate(other, [prompt], 20, temperature=0)[0]
        assert fast.generate(prompt, 20) == generate(model, [prompt], 20, temperature=0)[0]
    assert generate(other, [PROMPTS[0]], 20, temperature=0) != generate(model, [PROMPTS[0]], 20, temperature=0)
    hooked = LLM(model.config)
    hooked.layers[0].register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="plain tinyllama LLM"): CompiledDecoder(hooked)


# ------------------------------------------------------------------ one single-token step
@pytest.mark.slow
def test_generate_ppo_rollouts_and_the_compiled_decoder_share_decode_step(model, monkeypatch):
    import importlib
    gen = importlib.import_module("tinyllama.generate")  # the module (tinyllama.generate may be the function)
    calls = []
    real = gen.decode_step
    monkeypatch.setattr(gen, "decode_step", lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    generate(model, PROMPTS, 6, temperature=0)
    assert calls == [len(PROMPTS)] * 5  # prefill through forward, then five single-token steps
    calls.clear()
    list(decode_steps(model, PROMPTS[:2], 4, temperature=1.0, seed=0))  # what PPO's rollout calls
    assert calls == [2] * 3
    calls.clear()
    dec = gen.CompiledDecoder(model, steps_per_call=3)  # compiles decode_step at fixed shapes
    caches = model.new_kv_caches(1)
    with torch.inference_mode():
        model(torch.tensor([PROMPTS[0]]), kv_caches=caches)
        toks, last = dec._greedy_steps(torch.tensor([7]), dec._pos[3], [c.k for c in caches],
                                       [c.v for c in caches])
    assert calls == [1, 1, 1] and toks.shape == (3,) and last.shape == (1,)
