"""Behavioural tests that fail for the classic PPO bugs the rest of the suite let through (issue 11).

Each test states a property of what the trainer computes, checked against an independent computation
(the sampler's own logits, the public GAE, a model run on one unpadded row), never the source text.
tests/test_mutants.py puts each bug into a copy of the package and checks that these tests fail."""
import importlib
import math

import pytest
import torch

from tinyllama.generate import apply_temperature
from tinyllama.model import LLM, LLMConfig
from tinyllama.ppo import (PPOConfig, PPOTrainer, ValueModel, compute_gae, kl_penalised_rewards, masked_mean,
                           policy_loss, token_logprobs, value_loss, whiten)
from _rl import prompts, record_sampler

generate_module = importlib.import_module("tinyllama.generate")  # the package also has a function `generate`
torch.set_num_threads(1)

EOS, PAD = 2, 3
V = 12


def tiny_config(**kw):
    return LLMConfig(**{**dict(vocab_size=V, context_size=32, dim_emb=16, num_layers=1, num_heads=2, num_kv_heads=1,
                               ffd_hidden_dim=32), **kw})


def make_trainer(reward_fn=None, ref_seed=None, config_kw=None, value_head_seed=None, **ppo_kw):
    torch.manual_seed(0)
    policy = LLM(tiny_config(**(config_kw or {})))
    ref = None
    if ref_seed is not None:  # a reference that differs from the policy
        torch.manual_seed(ref_seed)
        ref = LLM(tiny_config(**(config_kw or {})))
    vm = ValueModel.from_llm(policy)
    if value_head_seed is not None:  # a value head that is not 0 everywhere
        g = torch.Generator().manual_seed(value_head_seed)
        with torch.no_grad():
            vm.value_head.weight.copy_(torch.randn(vm.value_head.weight.shape, generator=g))
    reward_fn = reward_fn or (lambda p, r: (r == 5).float())
    cfg = PPOConfig(**{**dict(batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=6, lr=3e-3), **ppo_kw})
    return PPOTrainer(policy, ref, vm, reward_fn, cfg, eos_id=EOS, pad_id=PAD)


def sampler_logprobs(seen, response_ids):
    "log p(token) under the distribution the sampler really drew each token from: (B, Tr)."
    cols = [torch.log_softmax(apply_temperature(z, t), -1) for z, t in seen]
    logp = torch.stack(cols, 1)  # (B, Tr, V)
    return logp.gather(-1, response_ids[:, : logp.shape[1], None]).squeeze(-1)


# -------------------------------------------------------- (a) sampled at one temperature, scored at another
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.5])
def test_rollout_logprobs_are_those_of_the_distribution_the_sampler_drew_from(monkeypatch, temperature):
    """The log-probs PPO stores as log π_old are the sampler's own: the logits the decoding loop held when it
    drew each token, at the temperature it drew with. Sampling at T and scoring at T' fails, and so does
    scoring with dropout on (the sampler always runs in eval mode)."""
    seen = record_sampler(monkeypatch)
    tr = make_trainer(temperature=temperature, config_kw=dict(emb_dropout=0.3))
    tr.policy.train()  # whatever the caller left it in
    ro = tr.rollout(prompts())
    assert len(seen) == ro.response_ids.shape[1] and all(t == temperature for _, t in seen)
    m = ro.response_mask.bool()
    drawn = sampler_logprobs(seen, ro.response_ids)
    assert torch.allclose(drawn[m], ro.logprobs[m], atol=1e-4), (drawn[m] - ro.logprobs[m]).abs().max()


def test_sampled_nll_matches_the_entropy_of_the_scored_distribution():
    """Over many tokens the mean of −log π(sampled token) estimates the mean entropy of the distribution the
    tokens came from. If the scored π is not the sampling one, the two drift apart."""
    tr = make_trainer(temperature=0.5, batch_size=256, mini_batch_size=256, max_new_tokens=8)
    ro = tr.rollout(prompts(256, seed=1))
    m = ro.response_mask
    logits = tr._forward(tr.policy, ro.input_ids, ro.attention_mask, ro.prompt_ids.shape[1])
    _, entropy = token_logprobs(logits.detach(), ro.response_ids, 0.5)
    nll, ent = float(masked_mean(-ro.logprobs, m)), float(masked_mean(entropy, m))
    assert abs(nll - ent) < 0.1 * ent, (nll, ent)


# --------------------------------------------------------------- (e) reference scored at the wrong temperature
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_a_reference_equal_to_the_policy_has_zero_kl_at_any_temperature(temperature):
    tr = make_trainer(temperature=temperature)  # ref_policy=None: a frozen copy of the policy
    ro = tr.rollout(prompts())
    m = ro.response_mask.bool()
    assert torch.allclose(ro.ref_logprobs[m], ro.logprobs[m], atol=1e-6)


def test_reference_logprobs_are_those_of_the_reference_at_the_sampling_temperature():
    tr = make_trainer(temperature=0.7, ref_seed=1)
    ps = prompts()
    ro = tr.rollout(ps)
    for i, p in enumerate(ps):  # each row alone, unpadded, through the reference
        n = int(ro.response_mask[i].sum())
        alone = torch.tensor([p + ro.response_ids[i, :n].tolist()])
        with torch.no_grad():
            lp, _ = token_logprobs(tr.ref_policy(alone[:, :-1])[:, len(p) - 1 :], alone[:, len(p) :], 0.7)
        assert torch.allclose(lp[0], ro.ref_logprobs[i, :n], atol=1e-5), i


# ------------------------------------------------------------------- (b) the value read one position late
def test_the_value_of_a_token_is_read_before_the_token():
    """V_old[t] is V(s_t): the value of the prompt and the first t response tokens, which must not see token t
    itself (the action it is a baseline for). Checked row by row against the value model run on the unpadded
    prefix, with a value head that is not zero so every position differs."""
    tr = make_trainer(value_head_seed=0)
    ps = prompts()
    ro = tr.rollout(ps)
    late = 0
    for i, p in enumerate(ps):
        n = int(ro.response_mask[i].sum())
        full = torch.tensor([p + ro.response_ids[i, :n].tolist()])
        with torch.no_grad():
            v = tr.value_model(full)[0]  # v[k]: the value after the first k + 1 tokens
        before = v[len(p) - 1 : len(p) - 1 + n]  # V(s_t): after the prompt and t response tokens
        assert torch.allclose(ro.values[i, :n], before, atol=1e-5), (i, ro.values[i, :n], before)
        late += int(not torch.allclose(before, v[len(p) : len(p) + n], atol=1e-3)) if n > 1 else 0
    assert late > 0  # the check can tell a late read from the right one


def test_the_update_reads_values_where_the_rollout_did():
    "Before any update the value model in the first minibatch gives back the rollout's V_old exactly."
    tr = make_trainer(value_head_seed=0, batch_size=16, mini_batch_size=16, ppo_epochs=1)
    tr.step(prompts())
    ro, first = tr.last_rollout, tr.minibatch_stats[0]
    m = ro.response_mask
    assert math.isclose(first["val/vpred"], float(masked_mean(ro.values, m)), abs_tol=1e-5)
    assert math.isclose(first["val/error"], float(masked_mean((ro.values - ro.returns) ** 2, m)), rel_tol=1e-4)


# ------------------------------------------------------------- (c) returns built from whitened advantages
@pytest.mark.parametrize("whiten_advantages", [True, False])
def test_returns_are_raw_gae_plus_values_and_only_the_advantages_are_whitened(whiten_advantages):
    tr = make_trainer(value_head_seed=0, gamma=0.9, lam=0.8, whiten_advantages=whiten_advantages,
                      reward_fn=lambda p, r: (r == 5).float() * 3.0)
    ro = tr.rollout(prompts())
    adv, ret = compute_gae(ro.rewards, ro.values, ro.response_mask, gamma=0.9, lam=0.8)
    assert torch.allclose(ro.returns, ret, atol=1e-5)
    expected = whiten(adv, ro.response_mask) if whiten_advantages else adv
    assert torch.allclose(ro.advantages, expected, atol=1e-5)
    assert not torch.allclose(whiten(adv, ro.response_mask), adv, atol=1e-2)  # whitening does change them


# ------------------------------------------------------------------ (d) the adaptive controller never moved
def test_the_trainer_moves_adaptive_beta_and_uses_the_moved_value():
    tr = make_trainer(adaptive_kl=True, init_kl_coef=0.1, target_kl=0.5, kl_horizon=50, ref_seed=1)
    ps = prompts()
    for _ in range(3):
        tr.step(ps)
    betas = [s["objective/kl_coef"] for s in tr.history]
    kls = [s["objective/kl"] for s in tr.history]
    assert betas[0] == 0.1
    for b0, b1, kl in zip(betas, betas[1:], kls):  # each step's KL moves the next step's β, towards the target
        assert (b1 > b0) if kl > 0.5 else (b1 < b0), (betas, kls)
    ro = tr.last_rollout  # and the rollout was penalised with the β of its step
    _, kl_tok = kl_penalised_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.response_mask, 0.0)
    assert torch.allclose(ro.rewards, ro.scores - betas[-1] * kl_tok, atol=1e-6)


def test_a_fixed_beta_stays_put():
    tr = make_trainer(init_kl_coef=0.1, ref_seed=1)
    for _ in range(2):
        tr.step(prompts())
    assert [s["objective/kl_coef"] for s in tr.history] == [0.1, 0.1] and tr.kl_ctl.value == 0.1


# ----------------------------------------------------------------------------- (f) the value model learns
@pytest.mark.parametrize("value_lr", [None, 1e-2])
def test_the_value_model_learns_and_its_loss_falls(value_lr):
    """A constant score of 1 per response and no KL: every valid token's return tends to 1, and the value
    model (head and trunk, in the optimizer at a non-zero learning rate) must learn it."""
    tr = make_trainer(reward_fn=lambda p, r: torch.ones(r.shape[0]), init_kl_coef=0.0, lr=1e-2, value_lr=value_lr,
                      vf_coef=1.0, ppo_epochs=4)
    before = [p.detach().clone() for p in tr.value_model.parameters()]
    errors = [tr.step(prompts())["val/error"] for _ in range(8)]
    moved = [not torch.equal(b, p) for b, p in zip(before, tr.value_model.parameters())]
    assert moved[-1] and sum(moved) > len(moved) // 2, moved  # the head and most of the trunk
    assert errors[-1] < 0.3 * errors[0], errors


# ---------------------------------------------------------------------- (g) per-token, not per-sequence
def test_the_policy_loss_is_a_mean_over_the_minibatchs_valid_tokens():
    """A one-token reply with advantage 4 and a four-token reply with advantage 1. A per-token mean weights
    every token 1/5 (loss −8/5); a per-sequence mean would weight the short reply's token 1/2 and each long
    reply's token 1/8 (loss −5/2), favouring short replies (DAPO; Dr. GRPO)."""
    m = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([[4.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    old = torch.full((2, 4), -1.0)
    new = old.clone().requires_grad_()
    loss, _ = policy_loss(new, old, adv, m, cliprange=0.2)
    loss.backward()
    assert math.isclose(loss.item(), -8 / 5, rel_tol=1e-6)
    assert torch.allclose(new.grad, -adv * m / 5)


def test_the_value_loss_is_a_mean_over_the_minibatchs_valid_tokens():
    m = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    ret = torch.tensor([[2.0, 5.0, 5.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    v = torch.zeros(2, 4, requires_grad=True)
    loss, _ = value_loss(v, torch.zeros(2, 4), ret, m, cliprange_value=10.0)
    loss.backward()
    assert math.isclose(loss.item(), 0.5 * (4 + 4 * 1) / 5, rel_tol=1e-6)
    assert torch.allclose(v.grad, -ret * m / 5)
