"""Tests of tinyllama.ppo: GAE, whitening, masking after EOS, left padding, the probability ratio before
the first update, dropout, the KL to the reference, and clear errors for bad input."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tinyllama.attention import position_ids_from_mask
from tinyllama.model import LLM, LLMConfig
from tinyllama.ppo import (AdaptiveKLController, PPOConfig, PPOTrainer, ValueModel, compute_gae,
                           kl_penalised_rewards, masked_mean, policy_loss, token_logprobs, value_loss, whiten)
from _rl import prompts

torch.set_num_threads(1)

EOS, PAD, BOS = 2, 3, 1
V = 12


def tiny_config(**kw):
    return LLMConfig(**{**dict(vocab_size=V, context_size=32, dim_emb=16, num_layers=1, num_heads=2, num_kv_heads=1,
                               ffd_hidden_dim=32), **kw})


def make_trainer(reward_fn=None, seed=0, model_seed=0, config_kw=None, **ppo_kw):
    torch.manual_seed(model_seed)
    policy = LLM(tiny_config(**(config_kw or {})))
    reward_fn = reward_fn or (lambda p, r: (r == 5).float())  # +1 for every token 5
    cfg = PPOConfig(**{**dict(batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=6, lr=3e-3, seed=seed),
                       **ppo_kw})
    return PPOTrainer(policy, None, ValueModel.from_llm(policy), reward_fn, cfg, eos_id=EOS, pad_id=PAD)


# ---------------------------------------------------------------------------------------------- GAE
def gae_brute_force(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(mask[b].sum())
        v = [float(values[b, t]) for t in range(n)] + [0.0]
        deltas = [float(rewards[b, t]) + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[b, t] = sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t))
    return adv


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 9), gamma=st.floats(0, 1), lam=st.floats(0, 1), seed=st.integers(0, 10**6),
       data=st.data())
def test_gae_matches_brute_force(B, T, gamma, lam, seed, data):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))
    m = (torch.arange(T) < lengths[:, None]).long()
    adv, ret = compute_gae(r, v, m, gamma, lam)
    expected = gae_brute_force(r, v, m, gamma, lam)
    assert torch.allclose(adv, expected, atol=1e-9)
    assert torch.allclose(ret, (expected + v) * m, atol=1e-9)
    assert (adv[m == 0] == 0).all() and (ret[m == 0] == 0).all()


def test_gae_ignores_values_and_rewards_after_the_end():
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    m = (torch.arange(6) < torch.tensor([[2], [6], [4]])).long()
    adv, ret = compute_gae(r, v, m)
    r2, v2 = r.masked_fill(m == 0, 1e6), v.masked_fill(m == 0, -1e6)
    adv2, ret2 = compute_gae(r2, v2, m)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_gae_rejects_bad_masks_and_shapes():
    with pytest.raises(ValueError, match="ones then zeros"):
        compute_gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="shape"):
        compute_gae(torch.zeros(1, 3), torch.zeros(1, 4), torch.ones(1, 3))


# -------------------------------------------------------------------------------------- whitening
@settings(max_examples=50, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 8), seed=st.integers(0, 10**6), data=st.data())
def test_whiten_uses_only_valid_entries(B, T, seed, data):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=g, dtype=torch.float64) * 3 + 1
    m = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 1), min_size=T, max_size=T), min_size=B, max_size=B)))
    if m.sum() < 2:
        return
    w = whiten(x, m)
    w_garbage = whiten(x.masked_fill(m == 0, 1e9), m)  # padding may hold anything
    assert torch.equal(w, w_garbage)
    valid = w[m.bool()]
    assert abs(float(valid.mean())) < 1e-9
    if float(x[m.bool()].var()) > 1e-2:  # well above whiten's eps, so the variance is 1 to within 1e-6
        assert abs(float(valid.var()) - 1) < 1e-6
    assert (w[m == 0] == 0).all()


def test_whiten_errors():
    with pytest.raises(ValueError, match="no entries"):
        whiten(torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="shape"):
        whiten(torch.ones(2, 2), torch.ones(2, 3))


# ------------------------------------------------------------------------------------------ losses
def test_policy_loss_clips_and_ignores_padding():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, 7.0]])
    m = torch.tensor([[1, 1, 0]])
    new = torch.log(torch.tensor([[0.75, 0.5, 0.9]])).requires_grad_()
    loss, stats = policy_loss(new, old, adv, m, cliprange=0.2)
    loss.backward()
    # token 0: ratio 1.5 > 1.2 with A > 0 is clipped (no gradient); token 1: ratio 1; token 2 is padding
    assert new.grad[0, 0] == 0 and new.grad[0, 2] == 0 and new.grad[0, 1] != 0
    assert math.isclose(loss.item(), (-1.2 + 1.0) / 2, rel_tol=1e-6)
    assert math.isclose(float(stats["policy/clipfrac"]), 0.5)


def test_value_loss_clips_around_old_values():
    old_v, ret = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])
    v = torch.tensor([[0.5, 0.1]], requires_grad=True)
    loss, stats = value_loss(v, old_v, ret, torch.ones(1, 2), cliprange_value=0.2)
    loss.backward()
    # the first value moved 0.5 > 0.2 towards the target: the clipped error (0.8²) is larger and has no gradient
    assert v.grad[0, 0] == 0 and v.grad[0, 1] != 0
    assert math.isclose(loss.item(), 0.5 * (0.8 ** 2 + 0.9 ** 2) / 2, rel_tol=1e-6)
    assert math.isclose(float(stats["val/clipfrac"]), 0.5)


def test_kl_penalised_rewards():
    scores = torch.tensor([[0.0, 1.0, 5.0]])
    lp, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -1.0, 0.0]])
    r, kl = kl_penalised_rewards(scores, lp, ref, torch.tensor([[1, 1, 0]]), kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0]]))
    assert torch.allclose(r, torch.tensor([[-0.05, 1.1, 0.0]]))


def test_the_k3_estimator_is_schulmans_and_the_trainer_uses_it():
    lp, ref, m = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -3.0]]), torch.tensor([[1, 1, 0]])
    r, kl = kl_penalised_rewards(torch.zeros(1, 3), lp, ref, m, kl_coef=0.1, estimator="k3")
    rho = torch.exp(ref - lp)  # π_ref/π
    assert torch.allclose(kl, ((rho - 1) - torch.log(rho)) * m) and (kl >= 0).all() and kl[0, 2] == 0
    assert torch.allclose(r, -0.1 * kl)
    # unbiased: the mean over tokens sampled from p is KL(p‖q), which is exact for two small distributions
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(6, generator=g).log_softmax(0), torch.randn(6, generator=g).log_softmax(0)
    true = float((p.exp() * (p - q)).sum())
    x = torch.multinomial(p.exp(), 200_000, replacement=True, generator=g)[None]
    ones = torch.ones_like(x)
    for est in ("k1", "k3"):
        _, k = kl_penalised_rewards(torch.zeros(x.shape), p[x], q[x], ones, 0.0, estimator=est)
        assert abs(float(k.mean()) - true) < 0.02, (est, float(k.mean()), true)
    tr = make_trainer(kl_estimator="k3", init_kl_coef=0.1, model_seed=0)
    tr.ref_policy = LLM(tiny_config()).requires_grad_(False)  # a reference that differs
    ro = tr.rollout(prompts())
    rho = torch.exp(ro.ref_logprobs - ro.logprobs)
    k3 = ((rho - 1) - torch.log(rho)) * ro.response_mask
    assert torch.allclose(ro.rewards, ro.scores - 0.1 * k3, atol=1e-5)
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k2")


def test_token_logprobs_use_the_temperature():
    z = torch.randn(2, 3, 7)
    t = torch.randint(0, 7, (2, 3))
    lp, ent = token_logprobs(z, t, temperature=0.5)
    ref = torch.distributions.Categorical(logits=z / 0.5)
    assert torch.allclose(lp, ref.log_prob(t), atol=1e-6) and torch.allclose(ent, ref.entropy(), atol=1e-5)


def test_adaptive_kl_controller_moves_towards_target():
    up, down = AdaptiveKLController(0.1, 6.0, 1000), AdaptiveKLController(0.1, 6.0, 1000)
    up.update(60.0, 100); down.update(0.6, 100)
    assert math.isclose(up.value, 0.1 * (1 + 0.2 * 0.1)) and math.isclose(down.value, 0.1 * (1 - 0.2 * 0.1))


# ------------------------------------------------------------------------------------- value model
def test_value_head_starts_at_zero_and_trunk_is_a_copy():
    torch.manual_seed(0)
    llm = LLM(tiny_config())
    vm = ValueModel.from_llm(llm)
    assert (vm.value_head.weight == 0).all() and (vm.value_head.bias == 0).all()
    assert (vm(torch.randint(0, V, (2, 5))) == 0).all()
    with torch.no_grad():
        vm.trunk.embed_tokens.weight.add_(1.0)
    assert not torch.equal(vm.trunk.embed_tokens.weight, llm.embed_tokens.weight)  # llm untouched


# ------------------------------------------------------------------------- the trainer: correctness
def test_ratio_is_one_on_the_first_minibatch_at_any_temperature():
    for temperature in (1.0, 0.7):
        tr = make_trainer(temperature=temperature, config_kw=dict(emb_dropout=0.5))
        tr.step(prompts())
        first = tr.minibatch_stats[0]
        assert first["policy/approxkl"] < 1e-6, (temperature, first)
        assert abs(first["policy/ratio_mean"] - 1) < 1e-5 and first["policy/clipfrac"] == 0
        assert tr.minibatch_stats[-1]["policy/approxkl"] > 1e-6  # later minibatches do see a moved policy


def test_logprobs_at_the_wrong_temperature_differ_from_the_sampled_ones():
    """Log-probs at temperature 1 of tokens sampled at 0.7 are measurably different from the rollout's. The
    first-minibatch ratio cannot show this (old and new log-probs come from the same function, so a wrong
    temperature in it cancels); tests/test_ppo_bugs.py compares them with the sampler's own logits."""
    tr = make_trainer(temperature=0.7)
    ro = tr.rollout(prompts())
    Tp = ro.prompt_ids.shape[1]
    with torch.no_grad():
        logits = tr._forward(tr.policy, ro.input_ids, ro.attention_mask, Tp)
    wrong, _ = token_logprobs(logits, ro.response_ids, 1.0)
    right, _ = token_logprobs(logits, ro.response_ids, 0.7)
    m = ro.response_mask
    assert torch.allclose(right * m, ro.logprobs, atol=1e-6)
    assert 0.5 * masked_mean((wrong * m - ro.logprobs) ** 2, m) > 1e-5


def test_left_padding_and_position_ids_from_the_mask():
    tr = make_trainer()
    seen = []
    hook = tr.policy.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw), with_kwargs=True)
    ps = prompts()
    ro = tr.rollout(ps)
    hook.remove()
    # prompts are right-aligned: PAD on the left only
    for i, p in enumerate(ps):
        k = len(p)
        assert ro.prompt_ids[i, -k:].tolist() == p and (ro.prompt_ids[i, :-k] == PAD).all()
        assert ro.prompt_mask[i, -k:].all() and not ro.prompt_mask[i, :-k].any()
    # the teacher-forced pass got positions that start at 0 on every row's first real token
    full = [kw for kw in seen if kw.get("position_ids") is not None and kw["position_ids"].shape[1] > 1][-1]
    assert torch.equal(full["position_ids"], position_ids_from_mask(full["attention_mask"]))
    # each row's log-probs equal those of the same row alone, unpadded
    Tp = ro.prompt_ids.shape[1]
    for i, p in enumerate(ps):
        n = int(ro.response_mask[i].sum())
        alone = torch.tensor([p + ro.response_ids[i, :n].tolist()])
        with torch.no_grad():
            lp, _ = token_logprobs(tr.policy(alone[:, :-1])[:, len(p) - 1:], alone[:, len(p):])
        assert torch.allclose(lp[0], ro.logprobs[i, :n], atol=1e-5), i


def test_everything_after_eos_is_masked():
    tr = make_trainer(reward_fn=lambda p, r: torch.ones(r.shape))  # a reward on every position, padding included
    tr.step(prompts(seed=3))
    ro = tr.last_rollout
    m = ro.response_mask.bool()
    ended = [(i, int(m[i].sum())) for i in range(m.shape[0]) if m[i].sum() < m.shape[1]]
    assert ended, "the test needs rows that stop at EOS before max_new_tokens"
    for i, n in ended:
        assert ro.response_ids[i, n - 1] == EOS  # EOS itself is a valid token...
        assert (ro.response_ids[i, n:] == PAD).all()  # ...and everything after it is PAD
        assert not (ro.response_ids[i, :n - 1] == EOS).any()
    for name in ("logprobs", "ref_logprobs", "values", "scores", "rewards", "advantages", "returns"):
        t = getattr(ro, name)
        assert (t[~m] == 0).all(), name  # exactly zero, so no loss, mean or GAE sees it
    assert PAD != EOS
    # the whitening used the valid tokens only
    assert abs(float(ro.advantages[m].mean())) < 1e-5 and abs(float(ro.advantages[m].var()) - 1) < 1e-4


def test_a_score_per_response_lands_on_its_last_token():
    tr = make_trainer(reward_fn=lambda p, r: torch.arange(r.shape[0], dtype=torch.float32))
    ro = tr.rollout(prompts(seed=3))
    last = ro.response_mask.sum(1) - 1
    for i in range(ro.scores.shape[0]):
        expected = torch.zeros(ro.scores.shape[1])
        expected[last[i]] = float(i)
        assert torch.equal(ro.scores[i], expected)


def test_missing_eos_penalty_lowers_only_cut_off_replies():
    score = lambda p, r: torch.ones(r.shape[0])
    ro0 = make_trainer(reward_fn=score).rollout(prompts(seed=3))
    ro = make_trainer(reward_fn=score, missing_eos_penalty=2.5).rollout(prompts(seed=3))
    assert torch.equal(ro.response_ids, ro0.response_ids)  # same samples, seeded
    ended = ((ro.response_ids == EOS) & ro.response_mask.bool()).any(1)
    assert ended.any() and (~ended).any()  # both kinds occur in this batch
    totals = ro.scores.sum(1)
    assert torch.equal(totals[ended], torch.ones(int(ended.sum())))
    assert torch.allclose(totals[~ended], torch.full((int((~ended).sum()),), -1.5))
    last = ro.response_mask.sum(1) - 1  # the penalty sits on the last real token
    assert torch.equal(ro.scores.nonzero()[:, 1], last[ro.scores.sum(1) != 0])
    with pytest.raises(ValueError, match="missing_eos_penalty"):
        PPOConfig(missing_eos_penalty=-1.0)


def test_dropout_is_off_in_every_model_during_rollouts_and_updates():
    tr = make_trainer(config_kw=dict(emb_dropout=0.5))
    modes = []
    for model in (tr.policy, tr.ref_policy, tr.value_model):
        for mod in model.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    for model in (tr.policy, tr.ref_policy, tr.value_model):
        model.train()  # whatever the caller left them in
    tr.step(prompts())
    assert len(modes) > 10 and not any(modes)
    # and so a step is a deterministic function of the seed, even with emb_dropout=0.5
    a, b = make_trainer(config_kw=dict(emb_dropout=0.5)), make_trainer(config_kw=dict(emb_dropout=0.5))
    a.policy.train(); b.policy.train()
    for _ in range(2):
        sa, sb = a.step(prompts()), b.step(prompts())
    assert {k: v for k, v in sa.items() if not k.startswith("time/")} == \
           {k: v for k, v in sb.items() if not k.startswith("time/")}
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters()):
        assert torch.equal(pa, pb)


def test_kl_to_the_reference_stays_non_negative_and_reward_rises():
    tr = make_trainer(reward_fn=lambda p, r: (r == 5).float(), init_kl_coef=0.02, batch_size=32, mini_batch_size=16)
    ps = prompts(32)
    kls, ses, rewards = [], [], []
    for _ in range(12):
        s = tr.step(ps)
        kls.append(s["objective/kl"]); ses.append(s["objective/kl_stderr"]); rewards.append(s["env/reward_mean"])
    assert kls[0] == 0.0  # the policy starts as the reference
    # a sample mean of log π − log π_ref over responses drawn from π: unbiased for KL >= 0, so it may dip below
    # zero only by noise, never by more than a few standard errors
    assert all(k >= -3 * se for k, se in zip(kls, ses)), list(zip(kls, ses))
    assert sum(kls) / len(kls) > 0
    assert kls[-1] > 0.1  # the policy did move away
    assert sum(rewards[-3:]) / 3 > 2 * max(sum(rewards[:2]) / 2, 0.2), rewards


def test_ref_policy_is_frozen_and_unchanged():
    tr = make_trainer()
    before = copy.deepcopy(tr.ref_policy.state_dict())
    tr.step(prompts())
    assert all(not p.requires_grad for p in tr.ref_policy.parameters())
    assert all(torch.equal(before[k], v) for k, v in tr.ref_policy.state_dict().items())
    assert not all(torch.equal(a, b) for a, b in zip(tr.policy.parameters(), tr.ref_policy.parameters()))


# ----------------------------------------------------------------------------------------- bad input
def test_bad_prompts_are_clear_errors():
    tr = make_trainer()
    with pytest.raises(ValueError, match="empty: give at least one prompt"):
        tr.step([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tr.step([[4, EOS], []])
    with pytest.raises(ValueError, match="context_size=32"):
        tr.step([[4] * 30])
    with pytest.raises(ValueError, match="pad_id"):
        tr.step([[4, PAD, EOS]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tr.step([[4, 99]])
    with pytest.raises(ValueError, match="list of integer token ids"):
        tr.step(["a prompt"])


def test_bad_reward_functions_are_clear_errors():
    with pytest.raises(ValueError, match="expected per-token rewards"):
        make_trainer(reward_fn=lambda p, r: torch.zeros(3)).step(prompts())
    with pytest.raises(ValueError, match="non-finite"):
        make_trainer(reward_fn=lambda p, r: torch.full(r.shape, float("nan"))).step(prompts())
    with pytest.raises(ValueError, match="must return a tensor"):
        make_trainer(reward_fn=lambda p, r: 1.0).step(prompts())


def test_bad_construction_is_a_clear_error():
    torch.manual_seed(0)
    policy = LLM(tiny_config())
    vm = ValueModel.from_llm(policy)
    f = lambda p, r: torch.zeros(r.shape)
    with pytest.raises(ValueError, match="PAD must differ from EOS"):
        PPOTrainer(policy, None, vm, f, eos_id=2, pad_id=2)
    with pytest.raises(ValueError, match="ref_policy is the policy itself"):
        PPOTrainer(policy, policy, vm, f)
    with pytest.raises(ValueError, match="eos_id must be a token id"):
        PPOTrainer(policy, None, vm, f, eos_id=V)
    with pytest.raises(ValueError, match="mini_batch_size"):
        PPOConfig(batch_size=4, mini_batch_size=8)
    with pytest.raises(ValueError, match="temperature"):
        PPOConfig(temperature=0)
    with pytest.raises(ValueError, match="lam"):
        PPOConfig(lam=1.5)
    with pytest.raises(ValueError, match="steps"):
        PPOTrainer(policy, None, vm, f).train(lambda s: [[4, EOS]], steps=0)
    with pytest.raises(ValueError, match="expects an LLMConfig, got dict"):
        ValueModel(dict(vocab_size=V))
    with pytest.raises(ValueError, match="from_llm expects an LLM, got ValueModel"):
        ValueModel.from_llm(vm)
    with pytest.raises(ValueError, match="PPOConfig.batch_size must be a positive integer"):
        PPOConfig(batch_size=0)
    with pytest.raises(ValueError, match="value_model must be a tinyllama model"):
        PPOTrainer(policy, None, "values", f)
