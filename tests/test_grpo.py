"""Tests of tinyllama.grpo: group advantages, the k3 estimator, the loss of both variants against a
brute-force computation, the ratio and the sampler's log-probabilities, padding after EOS, and clear
errors for bad configuration values."""
import copy
import importlib
import math
from dataclasses import replace

import pytest
import torch

from tinyllama.generate import apply_temperature
from tinyllama.grpo import (GRPOConfig, GRPOTrainer, grpo_loss, grpo_preset, group_advantages, kl_k3,
                            process_advantages, run_grpo_copy_task)
from tinyllama.model import LLM, LLMConfig
from tinyllama.ppo import ppo_preset
from _rl import prompts as _prompts, record_sampler

generate_module = importlib.import_module("tinyllama.generate")  # the package also has a function `generate`
torch.set_num_threads(1)

EOS, PAD, BOS = 2, 3, 1
V = 12


def prompts(n=4, seed=0):
    "Four prompts by default here (a group of G samples each)."
    return _prompts(n, seed)


def tiny_policy(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, context_size=32, dim_emb=16, num_layers=1, num_heads=2, num_kv_heads=1,
               ffd_hidden_dim=32)
    return LLM(LLMConfig(**{**cfg, **kw}))


def make_trainer(reward_fn=None, config_kw=None, **grpo_kw):
    policy = tiny_policy(**(config_kw or {}))
    reward_fn = reward_fn or (lambda p, r: (r == 5).float().sum(1))  # +1 for every token 5
    cfg = GRPOConfig(**{**dict(num_generations=4, mini_batch_size=8, ppo_epochs=2, max_new_tokens=6, lr=3e-3),
                        **grpo_kw})
    return GRPOTrainer(policy, None, reward_fn, cfg, eos_id=EOS, pad_id=PAD)


def loss_inputs(seed, B=6, T=7):
    "Random log-probs, advantages and a mask of ones then zeros, with garbage after each row's end."
    g = torch.Generator().manual_seed(seed)
    lp, old, ref = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).double()
    return lp, old, ref, adv, mask


# ------------------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("G", [2, 3, 8])
def test_each_group_s_advantages_sum_to_zero(G, scale):
    g = torch.Generator().manual_seed(G)
    r = torch.randn(5 * G, generator=g) * 3 + 2
    adv = group_advantages(r, G, scale=scale)
    assert adv.shape == r.shape
    assert torch.allclose(adv.view(5, G).sum(1), torch.zeros(5), atol=1e-4)
    # the groups are consecutive rows: the same rewards in one group of 5G would give other advantages
    assert not torch.allclose(adv, group_advantages(r, 5 * G, scale=scale), atol=1e-3)


def test_advantages_are_the_formula():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 6.0])
    mean, std = r.view(2, 4).mean(1, keepdim=True), r.view(2, 4).std(1, keepdim=True)  # unbiased, as in TRL
    assert torch.allclose(group_advantages(r, 4), ((r.view(2, 4) - mean) / (std + 1e-4)).view(-1))
    assert torch.allclose(group_advantages(r, 4, scale=False), (r.view(2, 4) - mean).view(-1))


def test_equal_rewards_give_zero_advantages_and_zero_policy_gradient():
    r = torch.tensor([2.0] * 4 + [0.0] * 4 + [5.0] * 4)
    for scale in (True, False):
        assert (group_advantages(r, 4, scale=scale) == 0).all()
    lp, old, ref, _, mask = loss_inputs(0, B=12)
    lp.requires_grad_(True)
    for variant in ("grpo", "dr_grpo"):
        loss, _ = grpo_loss(lp, old, ref, group_advantages(r, 4).double(), mask, 0.2, 0.0, variant)
        (grad,) = torch.autograd.grad(loss, lp)
        assert loss.item() == 0 and (grad == 0).all()


def test_a_constant_reward_leaves_the_policy_unchanged():
    "Through the whole trainer: every group has equal rewards, β = 0, so no parameter moves."
    tr = make_trainer(reward_fn=lambda p, r: torch.full((r.shape[0],), 3.0), beta=0.0)
    before = copy.deepcopy(tr.policy.state_dict())
    stats = tr.step(prompts())
    assert stats["frac_reward_zero_std"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in tr.policy.state_dict().items())



# ------------------------------------------------------------------------------ process supervision
def process_brute_force(rewards, mask, G, scale):
    "From nested lists: each token's return-to-go minus its group's mean at that position (/ std)."
    B, T = len(rewards), len(rewards[0])
    ret = [[sum(rewards[i][u] * mask[i][u] for u in range(t, T)) for t in range(T)] for i in range(B)]
    out = [[0.0] * T for _ in range(B)]
    for g0 in range(0, B, G):
        for t in range(T):
            col = [ret[i][t] for i in range(g0, g0 + G)]
            mean = sum(col) / G
            std = math.sqrt(sum((v - mean) ** 2 for v in col) / (G - 1))
            for i in range(g0, g0 + G):
                a = ret[i][t] - mean
                out[i][t] = (a / (std + 1e-4) if scale else a) if mask[i][t] else 0.0
    return out


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_process_advantages_equal_a_brute_force_computation(seed, scale):
    g = torch.Generator().manual_seed(seed)
    _, _, _, _, mask = loss_inputs(seed, B=8, T=5)
    r = torch.randint(0, 3, (8, 5), generator=g).double()
    adv = process_advantages(r, mask, 4, scale=scale)
    bf = torch.tensor(process_brute_force(r.tolist(), mask.tolist(), 4, scale))
    assert torch.allclose(adv.double(), bf.double(), atol=1e-5)


def test_process_advantages_ignore_padding_and_vanish_for_equal_returns():
    _, _, _, _, mask = loss_inputs(1, B=6, T=5)
    r = torch.randn(6, 5)
    a = process_advantages(r, mask, 3)
    assert (a[mask == 0] == 0).all()
    assert torch.equal(a, process_advantages(r.masked_fill(mask == 0, 99.0), mask, 3))  # garbage after EOS
    full = torch.ones(6, 5)
    for scale in (True, False):
        assert (process_advantages(torch.full((6, 5), 2.0), full, 3, scale=scale) == 0).all()
        # every position's advantages sum to zero over each group (all tokens valid)
        adv = process_advantages(r, full, 3, scale=scale).view(2, 3, 5)
        assert torch.allclose(adv.sum(1), torch.zeros(2, 5), atol=1e-4)


def test_a_token_is_credited_with_what_follows_it_only():
    "Two responses that differ only in their last token: the earlier tokens share the credit."
    r = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    a = process_advantages(r, torch.ones(2, 3), 2, scale=False)
    assert torch.equal(a, torch.tensor([[0.5, 0.5, 0.5], [-0.5, -0.5, -0.5]]))
    r = torch.tensor([[1.0, 0, 0], [0, 0, 0]])  # the first token alone earned the point
    a = process_advantages(r, torch.ones(2, 3), 2, scale=False)
    assert torch.equal(a, torch.tensor([[0.5, 0, 0], [-0.5, 0, 0]]))  # outcome GRPO: 0.5 everywhere


def test_one_token_per_response_gives_the_outcome_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 6.0])
    for scale in (True, False):
        a = process_advantages(r[:, None], torch.ones(8, 1), 4, scale=scale)[:, 0]
        assert torch.allclose(a, group_advantages(r, 4, scale=scale), atol=1e-6)


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo"])
def test_the_loss_takes_per_token_advantages(variant):
    "(B, T) advantages: the brute force with each token's own advantage; constant rows match (B,)."
    lp, old, ref, adv, mask = loss_inputs(4)
    per_tok = adv[:, None].expand_as(lp).clone()
    a, _ = grpo_loss(lp, old, ref, adv, mask, 0.2, 0.1, variant, max_tokens=9)
    b, _ = grpo_loss(lp, old, ref, per_tok, mask, 0.2, 0.1, variant, max_tokens=9)
    assert torch.allclose(a, b)
    per_tok[:, 0] = -per_tok[:, 0]  # the first token's advantage alone changes sign
    c, _ = grpo_loss(lp, old, ref, per_tok, mask, 0.2, 0.1, variant, max_tokens=9)
    assert not torch.allclose(a, c)
    bf = 0.0
    for i in range(lp.shape[0]):
        n = int(mask[i].sum())
        s = 0.0
        for t in range(n):
            rho = math.exp(lp[i, t] - old[i, t])
            A = per_tok[i, t].item()
            u = math.exp(ref[i, t] - lp[i, t])
            s += min(rho * A, min(max(rho, 0.8), 1.2) * A) - 0.1 * (u - math.log(u) - 1)
        bf += s / n if variant == "grpo" else s
    bf = -bf / (lp.shape[0] if variant == "grpo" else lp.shape[0] * 9)
    assert abs(c.item() - bf) < 1e-9


def test_a_per_token_reward_gives_per_token_advantages_in_the_trainer():
    "reward_fn returns (B, Tr): the rollout's advantages are process_advantages, its rewards the sums."
    fn = lambda p, r: (r == 5).float()  # +1 at every token 5
    tr = make_trainer(reward_fn=fn)
    ro = tr.rollout(prompts())
    tok = fn(None, ro.response_ids) * ro.response_mask
    assert ro.advantages.shape == ro.response_ids.shape
    assert torch.allclose(ro.advantages, process_advantages(tok, ro.response_mask, 4))
    assert torch.allclose(ro.rewards, tok.sum(1))


# ------------------------------------------------------------------------------------------------- k3
def test_k3_is_never_negative_and_zero_exactly_where_the_policies_agree():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(500, 7, generator=g) * 4, -1)
    ref = torch.log_softmax(torch.randn(500, 7, generator=g) * 4, -1)
    for dtype in (torch.float32, torch.float64):
        k3 = kl_k3(lp.to(dtype), ref.to(dtype))
        assert (k3 >= 0).all()
        assert (kl_k3(lp.to(dtype), lp.to(dtype)) == 0).all()
    apart = (lp - ref).abs() > 1e-4
    assert apart.float().mean() > 0.9 and (k3[apart] > 0).all()  # 0 only where π = π_ref
    assert (kl_k3(lp.double(), lp.double() + 1e-3) > 0).all()


def test_k3_is_an_unbiased_estimate_of_the_kl():
    g = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(torch.randn(6, generator=g), -1)
    ref = torch.log_softmax(torch.randn(6, generator=g), -1)
    y = torch.multinomial(lp.exp(), 200_000, replacement=True, generator=g)
    exact = float((lp.exp() * (lp - ref)).sum())
    assert abs(float(kl_k3(lp[y], ref[y]).mean()) - exact) < 0.01 * max(exact, 0.1)


# ----------------------------------------------------------------------------------------------- loss
def brute_force(lp, old, ref, adv, mask, eps, beta, variant, T_max):
    total, B = 0.0, len(lp)
    for i in range(B):
        n, s = int(sum(mask[i])), 0.0
        for t in range(n):
            rho = math.exp(lp[i][t] - old[i][t])
            clip = min(max(rho, 1 - eps), 1 + eps)
            u = math.exp(ref[i][t] - lp[i][t])
            s += min(rho * adv[i], clip * adv[i]) - beta * (u - math.log(u) - 1)
        total += s / n if variant == "grpo" else s
    return -total / (B if variant == "grpo" else B * T_max)


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("seed", range(5))
def test_the_loss_equals_a_brute_force_per_token_computation(variant, seed):
    lp, old, ref, adv, mask = loss_inputs(seed)
    for eps, beta, T_max in ((0.2, 0.04, 16), (0.05, 0.5, 7)):
        loss, _ = grpo_loss(lp, old, ref, adv, mask, eps, beta, variant, max_tokens=T_max)
        bf = brute_force(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), eps, beta,
                         variant, T_max)
        assert abs(loss.item() - bf) < 1e-9, (loss.item(), bf)


def test_dr_grpo_uses_the_constant_and_the_mask_s_width_by_default():
    lp, old, ref, adv, mask = loss_inputs(3)
    a, _ = grpo_loss(lp, old, ref, adv, mask, variant="dr_grpo")
    b, _ = grpo_loss(lp, old, ref, adv, mask, variant="dr_grpo", max_tokens=2 * mask.shape[1])
    assert torch.allclose(a, 2 * b)


def test_clip_statistics_count_the_clipped_tokens():
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 1.5]]))  # ratios to old (log 1 = 0)
    old = torch.zeros(1, 4)
    for A, low, high in ((1.0, 0.0, 1 / 3), (-1.0, 1 / 3, 0.0)):  # the 4th token is padding
        _, s = grpo_loss(lp, old, old, torch.tensor([A]), torch.tensor([[1, 1, 1, 0]]), 0.2, 0.0)
        assert (s["clip_ratio/low_mean"].item(), s["clip_ratio/high_mean"].item()) == pytest.approx((low, high))


# ---------------------------------------------------------------------------- padding after EOS, masks
@pytest.mark.parametrize("variant", ["grpo", "dr_grpo"])
def test_padding_after_eos_contributes_nothing(variant):
    lp, old, ref, adv, mask = loss_inputs(7)
    lp.requires_grad_(True)
    loss, stats = grpo_loss(lp, old, ref, adv, mask, 0.2, 0.1, variant)
    (grad,) = torch.autograd.grad(loss, lp)
    assert (grad[mask == 0] == 0).all()
    pad = mask == 0
    noisy = [x.detach().masked_fill(pad, v) for x, v in ((lp, 5.0), (old, -30.0), (ref, 9.0))]
    loss2, stats2 = grpo_loss(*noisy, adv, mask, 0.2, 0.1, variant)
    assert torch.allclose(loss, loss2) and all(torch.allclose(stats[k], stats2[k]) for k in stats)


def test_the_rollout_pads_after_eos_and_masks_it():
    tr = make_trainer(max_new_tokens=8)
    ro = tr.rollout(prompts(6))
    m = ro.response_mask.bool()
    assert ro.response_ids.shape[0] == 24
    ended = ~m[:, -1]
    assert ended.any()  # some rows stopped early, so the check below has something to check
    assert (ro.response_ids[~m] == PAD).all()
    assert (ro.logprobs[~m] == 0).all() and (ro.ref_logprobs[~m] == 0).all()
    last = m.sum(1) - 1
    assert (ro.response_ids[ended, last[ended]] == EOS).all()  # the mask includes the EOS


# ------------------------------------------------------------------- the ratio and the sampler's log-probs


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.5])
def test_old_logprobs_are_those_of_the_sampler_at_its_temperature(monkeypatch, temperature):
    seen = record_sampler(monkeypatch)
    tr = make_trainer(temperature=temperature, config_kw=dict(emb_dropout=0.3))
    tr.policy.train()  # whatever the caller left it in
    ro = tr.rollout(prompts(5))
    assert len(seen) == ro.response_ids.shape[1] and all(t == temperature for _, t in seen)
    cols = [torch.log_softmax(apply_temperature(z, t), -1) for z, t in seen]
    drawn = torch.stack(cols, 1).gather(-1, ro.response_ids[..., None]).squeeze(-1)
    m = ro.response_mask.bool()
    assert torch.allclose(drawn[m], ro.logprobs[m], atol=1e-4), (drawn[m] - ro.logprobs[m]).abs().max()


def test_the_ratio_is_one_at_the_first_update_and_not_after():
    tr = make_trainer(temperature=0.7, ppo_epochs=3, mini_batch_size=8)
    for _ in range(2):
        tr.step(prompts(4))
        first, later = tr.minibatch_stats[0], tr.minibatch_stats[-1]
        assert first["approx_kl"] < 1e-10 and first["clip_ratio/region_mean"] == 0
        assert later["approx_kl"] > 1e-8  # the policy moved: the check above can fail


def test_groups_are_consecutive_copies_of_each_prompt():
    tr = make_trainer()
    ps = prompts(3)
    ro = tr.rollout(ps)
    G = tr.config.num_generations
    for i, p in enumerate(ps):
        for j in range(G):
            row = ro.prompt_ids[i * G + j]
            assert row[ro.prompt_mask[i * G + j].bool()].tolist() == p
    assert len({tuple(r.tolist()) for r in ro.response_ids}) > 3  # the copies sample differently


def test_the_reward_rises_on_a_toy_task():
    tr = make_trainer(lr=1e-2, beta=0.0, mini_batch_size=16, max_new_tokens=6)
    hist = tr.train(lambda step: prompts(4, seed=step), 25, progress=False)
    first, last = sum(s["reward"] for s in hist[:3]) / 3, sum(s["reward"] for s in hist[-3:]) / 3
    assert last > first + 1.0, (first, last)


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "field, value",
    [("num_generations", 1), ("num_generations", 2.0), ("mini_batch_size", 0), ("ppo_epochs", -1),
     ("max_new_tokens", True), ("lr", 0), ("lr", float("nan")), ("temperature", 0), ("cliprange", -0.1),
     ("beta", -0.01), ("beta", float("inf")), ("variant", "ppo"), ("max_grad_norm", 0), ("seed", 1.5)],
)
def test_bad_config_values_are_clear_errors(field, value):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**{field: value})


def test_good_config_values_pass():
    GRPOConfig(beta=0.0, variant="dr_grpo", max_grad_norm=None, num_generations=2)
    assert GRPOConfig(variant="dr_grpo").scale_rewards is False and GRPOConfig().scale_rewards


def test_bad_trainer_arguments_are_clear_errors():
    p = tiny_policy()
    fn = lambda p, r: torch.zeros(r.shape[0])
    with pytest.raises(ValueError, match="ref_policy is the policy itself"):
        GRPOTrainer(p, p, fn)
    with pytest.raises(ValueError, match="GRPOConfig"):
        GRPOTrainer(p, None, fn, config=object())
    with pytest.raises(ValueError, match="eos_id and pad_id"):
        GRPOTrainer(p, None, fn, eos_id=3, pad_id=3)
    with pytest.raises(ValueError, match="callable"):
        GRPOTrainer(p, None, "reward")
    tr = make_trainer(reward_fn=lambda p, r: torch.zeros(r.shape[0], 2))
    with pytest.raises(ValueError, match="one score per response"):
        tr.step(prompts())
    with pytest.raises(ValueError, match="pad_id"):
        make_trainer().step([[4, PAD, EOS]])
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        process_advantages(torch.zeros(6, 3), torch.ones(6, 3), 4)
    with pytest.raises(ValueError, match="one shape"):
        process_advantages(torch.zeros(4, 3), torch.ones(4, 2), 2)
    with pytest.raises(ValueError, match="variant"):
        grpo_loss(*loss_inputs(0), variant="ppo")


# --------------------------------------------------------------------------------------- the copy task
def test_the_preset_has_ppo_s_budget():
    for prof in ("ci", "cpu", "gpu"):
        g, p = grpo_preset(prof), ppo_preset(prof)
        assert g.task == p and g.num_generations * g.prompts_per_step == p.batch_size


def test_the_preset_uses_process_supervision_and_checks_it():
    p = grpo_preset("ci")
    assert p.supervision == "process" and p.num_generations == 4
    with pytest.raises(ValueError, match="supervision"):
        replace(p, supervision="steps")


@pytest.mark.parametrize("supervision", ["outcome", "process"])
def test_the_copy_task_gives_the_reward_its_supervision_asks_for(supervision):
    p = grpo_preset("ci")
    p = replace(p, supervision=supervision, task=replace(p.task, max_steps=1, eval_every=1, n_train=50,
                                                         n_eval=10))
    r = run_grpo_copy_task(p, device="cpu", progress=False)
    ro = r.trainer.last_rollout
    assert ro.advantages.dim() == (2 if supervision == "process" else 1)
    assert r.trainer.reward_fn.__name__ == ("rewards" if supervision == "process" else "score")


def test_the_copy_task_runs_and_records_its_budget():
    p = grpo_preset("ci")
    p = replace(p, task=replace(p.task, max_steps=2, eval_every=1, n_train=50, n_eval=10))
    r = run_grpo_copy_task(p, device="cpu", progress=False)
    assert len(r.history) == 2 and len(r.checks) == 3
    assert r.sampled_tokens == sum(int(s["num_tokens"]) for s in r.history) > 0
    assert set(r.words["train"]).isdisjoint(r.words["test"])


def test_bad_arguments_of_the_copy_task_are_clear_errors():
    with pytest.raises(ValueError, match="seed must be an integer"):  # checked by copy_task
        run_grpo_copy_task("ci", seed=1.5, progress=False)
    with pytest.raises(ValueError, match="GRPOPreset.prompts_per_step must be a positive integer"):
        replace(grpo_preset("ci"), prompts_per_step=0)
    with pytest.raises(ValueError, match="policy must be a tinyllama LLM"):
        GRPOTrainer("policy", tiny_policy(), lambda p, r: r)
