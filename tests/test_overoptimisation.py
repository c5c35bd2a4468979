"Chapter 15: best-of-n's KL and selection, the judge's points, the presets, an end-to-end ci run."
import copy
import dataclasses
import itertools
import math

import pytest
import torch

from tinyllama.feedback import ScriptedLabeler, feedback_preset
from tinyllama.overoptimisation import (Judge, OveroptPreset, Point, best_of_n_exact_kl, best_of_n_index,
                                        best_of_n_kl, best_of_n_probs, best_of_n_proxy, overopt_preset, peak,
                                        run_overoptimisation, sample_bank)


# --- best-of-n's KL -------------------------------------------------------------------------------

def brute_force_best_of_n(probs, n):
    "The distribution of the best of n draws, by enumerating every n-tuple of outcomes."
    K, q = len(probs), [0.0] * len(probs)
    for draws in itertools.product(range(K), repeat=n):
        q[max(draws)] += math.prod(probs[i] for i in draws)  # outcome i: i-th worst reward
    return q


@pytest.mark.parametrize("probs", [[0.5, 0.5], [0.4, 0.3, 0.2, 0.1], [0.05, 0.15, 0.6, 0.2]])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_best_of_n_distribution_and_kl_equal_a_brute_force_computation(probs, n):
    q = brute_force_best_of_n(probs, n)
    assert torch.allclose(best_of_n_probs(probs, n), torch.tensor(q, dtype=torch.float64), atol=1e-12)
    kl = sum(qi * math.log(qi / pi) for qi, pi in zip(q, probs) if qi > 0)
    assert best_of_n_exact_kl(probs, n) == pytest.approx(kl, abs=1e-12)
    assert kl <= best_of_n_kl(n) + 1e-12  # with ties (few outcomes) the formula is an upper bound


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64])
def test_the_formula_is_the_limit_of_finer_and_finer_categoricals(n):
    uniform = lambda K: torch.full((K,), 1 / K, dtype=torch.float64)
    exact = [best_of_n_exact_kl(uniform(K), n) for K in (50, 500, 5000)]
    assert exact[0] <= exact[1] + 1e-9 <= exact[2] + 2e-9 <= best_of_n_kl(n) + 3e-9
    assert best_of_n_kl(n) - exact[2] < 5e-3


def test_the_formula_at_small_n():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)


def test_best_of_n_kl_matches_a_monte_carlo_estimate_of_a_continuous_reward():
    # rewards uniform on [0, 1]: the best of n has density n u^(n-1); KL = E[log n u^(n-1)]
    g, n = torch.Generator().manual_seed(0), 8
    u = torch.rand(200_000, n, generator=g, dtype=torch.float64).max(1).values
    mc = (math.log(n) + (n - 1) * u.log()).mean().item()
    assert mc == pytest.approx(best_of_n_kl(n), abs=0.01)


# --- selection ------------------------------------------------------------------------------------

def test_best_of_n_index_is_the_argmax_among_the_first_n():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(50, 16, generator=g)
    for n in range(1, 17):
        want = [max(range(n), key=lambda j: row[j].item()) for row in scores]
        assert best_of_n_index(scores, n).tolist() == want
    later = scores.clone()
    later[:, 4:] = 100.0  # replies after the first n never count
    assert torch.equal(best_of_n_index(later, 4), best_of_n_index(scores, 4))


def test_ties_keep_the_first_reply():
    assert best_of_n_index(torch.tensor([[1.0, 3.0, 3.0]]), 3).tolist() == [1]


def test_the_proxy_never_falls_as_n_grows():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(40, 64, generator=g)
    proxy = best_of_n_proxy(scores, range(1, 65))
    assert all(b >= a for a, b in zip(proxy, proxy[1:]))
    assert proxy[0] == pytest.approx(scores[:, 0].mean().item())
    assert proxy[-1] == pytest.approx(scores.max(1).values.mean().item())


def fake_judge(prompts, reference):
    "A Judge without models: only the labeller and the reference replies (for best_of_n)."
    j = Judge.__new__(Judge)
    j.labeler, j.prompts, j.reference, j.seed = ScriptedLabeler(), list(prompts), list(reference), 0
    return j


def test_the_judge_keeps_the_proxy_s_choice_and_the_labeller_judges_it():
    feel = lambda w: f"Tom was {w}."  # the scripted labeller scores the last feeling word
    prompts = ["Write a story.", "Write a story."]
    judge = fake_judge(prompts, [feel("calm"), feel("calm")])
    bank = [[feel("sad"), feel("proud"), feel("happy")], [feel("upset"), feel("glad"), feel("sad")]]
    # the proxy likes request 0's "happy" best and request 1's "sad": a proxy that is partly wrong
    scores = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 3.0]])
    points = judge.best_of_n(bank, scores, [1, 2, 3], seconds=30.0)
    assert [p.setting["n"] for p in points] == [1, 2, 3]
    assert [p.kl for p in points] == [best_of_n_kl(n) for n in (1, 2, 3)]
    assert [p.proxy for p in points] == [0.0, 1.0, 2.5]  # rises with n
    assert [p.win_rate for p in points] == [0.0, 1.0, 0.5]  # the truth peaks at n = 2
    assert [p.seconds for p in points] == [10.0, 20.0, 30.0]
    best, last = peak(points)
    assert best.setting == {"n": 2} and last.setting == {"n": 3}


def test_a_point_reports_its_rate_count_and_interval():
    p = Point("PPO", {"beta": 0.1, "steps": 80}, 2.5, 1.2,
              dict(wins=150, ties=0, losses=50, n=200, win_rate=0.75))
    lo, hi = p.interval()
    assert lo < 0.75 < hi and hi - lo < 0.13
    assert "75.0% of 200" in str(p) and "beta=0.1" in str(p) and "KL 2.50" in str(p)


# --- presets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["ci", "cpu", "gpu"])
def test_the_preset_takes_chapter_12_s_labels(profile):
    p, fb = overopt_preset(profile), feedback_preset(profile)
    assert (p.n_label, p.max_new_tokens, p.val_fraction) == (fb.n_label, fb.max_new_tokens,
                                                              fb.rm_val_fraction)
    assert (p.rm_steps, p.rm_batch_size, p.min_pairs) == (fb.rm_steps, fb.rm_batch_size, fb.min_pairs)
    assert p.ppo_steps % p.ppo_every == 0 and p.sweep_steps % p.ppo_every == 0
    assert len(p.ppo_betas) >= 3 and len(p.dpo_betas) >= 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.n_label = 1


def test_a_preset_whose_sweep_is_not_a_checkpoint_is_refused():
    p = overopt_preset("ci")
    with pytest.raises(ValueError, match="sweep_steps"):
        dataclasses.replace(p, ppo_steps=4, ppo_every=2, sweep_steps=3)
    with pytest.raises(ValueError, match="sweep_steps"):
        dataclasses.replace(p, ppo_steps=2, ppo_every=1, sweep_steps=4)
    with pytest.raises(ValueError, match="beta"):
        dataclasses.replace(p, dpo_betas=())


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -1, 1.5, True, "4", None])
def test_bad_n_gives_a_clear_value_error(n):
    with pytest.raises(ValueError, match="positive integer"):
        best_of_n_kl(n)
    with pytest.raises(ValueError, match="positive integer"):
        best_of_n_index(torch.zeros(2, 4), n)


def test_bad_input_gives_a_clear_value_error():
    with pytest.raises(ValueError, match="sum to 1"):
        best_of_n_probs([0.5, 0.6], 2)
    with pytest.raises(ValueError, match="positive"):
        best_of_n_exact_kl([1.0, 0.0], 2)
    with pytest.raises(ValueError, match="1-d"):
        best_of_n_probs([[0.5, 0.5]], 2)
    with pytest.raises(ValueError, match="only 4 replies"):
        best_of_n_index(torch.zeros(2, 4), 5)
    with pytest.raises(ValueError, match="requests, replies"):
        best_of_n_index(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="requests, replies"):
        best_of_n_proxy([[1.0, 2.0]], [1])
    with pytest.raises(ValueError, match="empty"):
        peak([])
    with pytest.raises(ValueError, match="must be an LLM"):
        run_overoptimisation(torch.nn.Linear(2, 2), None, "/tmp")
    with pytest.raises(ValueError, match="profile"):
        overopt_preset("laptop")


# --- end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_policy():
    from tinyllama.data import default_world
    from tinyllama.model import LLM, LLMConfig
    from tinyllama.tokenizer import train_tokenizer

    tok = train_tokenizer([s.text for s in default_world().sample(300, seed="test-overopt")],
                          vocab_size=400, num_threads=1)
    torch.manual_seed(0)
    return LLM(LLMConfig(vocab_size=tok.vocab_size, context_size=128, dim_emb=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, ffd_hidden_dim=64)).eval(), tok


def test_sample_bank_draws_n_replies_per_request_reproducibly(tiny_policy):
    policy, tok = tiny_policy
    prompts = ["Write a story about Tom.", "Write a story about Mia."]
    bank = sample_bank(policy, tok, prompts, 3, 8, seed=0, rows=4)  # two generate calls
    assert [len(row) for row in bank] == [3, 3] and all(isinstance(x, str) for r in bank for x in r)
    assert sample_bank(policy, tok, prompts, 3, 8, seed=0) == bank  # batching does not matter
    assert sample_bank(policy, tok, prompts, 2, 8, seed=0) == [row[:2] for row in bank]
    with pytest.raises(ValueError, match="positive integer"):
        sample_bank(policy, tok, prompts, 0, 8)


@pytest.mark.slow
def test_the_ci_lab_runs_end_to_end(tiny_policy, tmp_path):
    policy, tok = tiny_policy
    before = copy.deepcopy(policy.state_dict())
    p = overopt_preset("ci")
    run = run_overoptimisation(policy, tok, tmp_path, p, seed=0)
    assert isinstance(run.preset, OveroptPreset) and (tmp_path / "labels.jsonl").is_file()
    assert [q.setting["n"] for q in run.best_of_n] == list(range(1, p.bon_max_n + 1))
    assert [q.kl for q in run.best_of_n] == [best_of_n_kl(n) for n in range(1, p.bon_max_n + 1)]
    proxy = [q.proxy for q in run.best_of_n]
    assert all(b >= a for a, b in zip(proxy, proxy[1:]))
    assert [q.setting["steps"] for q in run.ppo_long] == list(range(p.ppo_every, p.ppo_steps + 1,
                                                                    p.ppo_every))
    assert [q.setting["beta"] for q in run.ppo_sweep] == list(p.ppo_betas)
    assert [q.setting["beta"] for q in run.dpo_sweep] == list(p.dpo_betas)
    assert {q.setting["steps"] for q in run.ppo_sweep + run.dpo_sweep} == {p.sweep_steps}
    points = run.best_of_n + run.ppo_long + run.ppo_sweep + run.dpo_sweep + [run.sft]
    assert all(q.verdict["n"] == p.n_heldout and 0 <= q.win_rate <= 1 for q in points)
    assert all(math.isfinite(q.kl) and math.isfinite(q.proxy) for q in points)
    assert run.sft.kl == 0.0 and 0 <= run.rm_accuracy <= 1 and run.n_train_pairs > 0
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())  # π_SFT untouched
