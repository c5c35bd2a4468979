"""Tests of tinyllama.rlvr: the verifiable reward, the unbiased pass@k estimator against brute
force, the adapter that gives chapter 14's GRPOTrainer its prompts and rewards (aligned with the
right questions through a real rollout), the KL of the samples, and clear errors for bad input."""
import importlib
import math
import random
from itertools import combinations

import pytest
import torch

from tinyllama.data import default_world
from tinyllama.grpo import GRPOConfig, GRPOTrainer
from tinyllama.model import LLM, LLMConfig
from tinyllama.rlvr import (AnswerReward, AnswerSamples, RLVRPreset, answer_reward, pass_at_k,
                            question_batches, question_prompt, rlvr_config, rlvr_preset,
                            sample_answers)
from tinyllama.sft import QAItem, exact_match, qa_items
from tinyllama.tokenizer import train_tokenizer
from _models import randomize_

generate_module = importlib.import_module("tinyllama.generate")  # the module, not the function
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stories():
    return default_world().sample(40, seed="test-rlvr")


@pytest.fixture(scope="module")
def tok(stories):
    more = default_world().sample(300, seed="test-rlvr-tok")
    return train_tokenizer([s.text for s in stories + more], vocab_size=400)


@pytest.fixture(scope="module")
def items(stories):
    return qa_items(stories[:6])


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    return LLM(LLMConfig(vocab_size=tok.vocab_size, context_size=256, dim_emb=32, num_layers=1,
                         num_heads=4, num_kv_heads=2, ffd_hidden_dim=64)).eval()


# ---- the reward

@pytest.mark.parametrize("reply, answer, r", [
    ("red", "red", 1.0), ("Red.", "red", 1.0), ("  the park ", "park", 1.0), ("a dog", "dog", 1.0),
    ("blue", "red", 0.0), ("", "red", 0.0), ("red ball", "red", 0.0), ("reds", "red", 0.0),
])
def test_reward_is_one_exactly_on_a_correct_answer(reply, answer, r):
    assert answer_reward(reply, answer) == r
    assert answer_reward(reply, answer) == float(exact_match(reply, answer))


def test_reward_of_every_question_against_every_answer(items):
    for q in items:
        for other in items:
            assert answer_reward(other.answer, q.answer) == float(other.answer == q.answer)


@pytest.mark.parametrize("bad", [(None, "red"), ("red", 3), (["red"], "red")])
def test_reward_rejects_non_strings(bad):
    with pytest.raises(TypeError, match="two strings"):
        answer_reward(*bad)


# ---- pass@k

def brute_pass_at_k(n, c, k):
    "The share of all k-subsets of n samples (the first c correct) holding a correct one."
    subsets = list(combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 10))
def test_pass_at_k_equals_brute_force_over_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_ends_and_pass_at_1():
    for n in (1, 8, 50, 1000):
        for k in {1, min(8, n), n}:
            assert pass_at_k(n, n, k) == 1.0
            assert pass_at_k(n, 0, k) == 0.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(8, 1, 8) == 1.0  # one correct sample among all 8
    # large n: the product form neither overflows nor loses the answer
    assert pass_at_k(10_000, 1, 5000) == pytest.approx(0.5)
    assert pass_at_k(2000, 10, 100) == pytest.approx(1 - math.comb(1990, 100) / math.comb(2000, 100))


def test_pass_at_k_is_unbiased_where_the_plug_in_is_not():
    "Over every outcome of n Bernoulli(p) samples, the estimator's mean is 1 − (1 − p)^k."
    n, k, p = 8, 4, 0.2
    mean = sum(math.comb(n, c) * p**c * (1 - p) ** (n - c) * pass_at_k(n, c, k) for c in range(n + 1))
    plug = sum(math.comb(n, c) * p**c * (1 - p) ** (n - c) * (1 - (1 - c / n) ** k)
               for c in range(n + 1))
    truth = 1 - (1 - p) ** k
    assert mean == pytest.approx(truth, abs=1e-12)
    assert plug < truth - 0.01


@pytest.mark.parametrize("n, c, k, match", [
    (8, 2, 9, "k must be in"), (8, 2, 0, "k must be in"), (0, 0, 1, "at least 1"),
    (8, 9, 1, "c .* must be in"), (8, -1, 1, "c .* must be in"), (8.0, 2, 1, "integer"),
    (8, 2, True, "integer"), (8, "2", 1, "integer"),
])
def test_pass_at_k_bad_inputs(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_answer_samples_pass_at_checks_k_and_kinds(items):
    s = AnswerSamples(items, 8, [8] * len(items), 0.0)
    assert s.pass_at(8) == 1.0 and s.pass_at(1, items[0].kind) == 1.0
    with pytest.raises(ValueError, match="k must be in"):
        s.pass_at(9)
    with pytest.raises(ValueError, match="no question of kind"):
        s.pass_at(1, "weather")


def test_answer_samples_intervals(items):
    from tinyllama.sft import wilson_interval
    correct = [0, 3, 8, 1, 0, 5] * (len(items) // 6) + [2] * (len(items) % 6)
    s = AnswerSamples(items, 8, correct, None)
    n_any = sum(c > 0 for c in correct)
    assert s.interval(8) == wilson_interval(n_any, len(items))  # pass@n: a rate of questions
    assert s.count() == len(items) and s.count(items[0].kind) == sum(q.kind == items[0].kind for q in items)
    for k in (1, 4):  # below n: a normal interval around the mean over questions
        lo, hi = s.interval(k)
        xs = [pass_at_k(8, c, k) for c in correct]
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
        assert lo < s.pass_at(k) < hi and (hi - lo) / 2 == pytest.approx(1.96 * sd / math.sqrt(len(xs)))
    wide = AnswerSamples(items[:2], 8, correct[:2], None).interval(1)
    assert wide[1] - wide[0] > hi - lo or wide == (0.0, 1.0)  # fewer questions, a wider interval
    with pytest.raises(ValueError, match="no question of kind"):
        s.interval(1, "weather")


def test_cpu_pass_at_k_is_known_to_five_points():
    "Issue 11: the questions sampled per kind give pass@8 a ±5-point interval at any rate."
    from tinyllama.sft import wilson_interval
    m = rlvr_preset("cpu").eval_per_kind
    lo, hi = wilson_interval(m // 2, m)
    assert (hi - lo) / 2 <= 0.05, m


# ---- the adapter

def answer_ids(tok, text):
    return tok.encode(text) + [tok.end_id]


def batch(tok, rows, responses):
    "Left-padded prompts, right-padded responses (as GRPOTrainer hands them over)."
    T = max(map(len, rows))
    p = torch.tensor([[tok.pad_id] * (T - len(r)) + r for r in rows])
    Tr = max(map(len, responses))
    y = torch.tensor([r + [tok.pad_id] * (Tr - len(r)) for r in responses])
    return p, y


def test_adapter_prompts_are_chapter_9_chats(items, tok):
    reward = AnswerReward(items, tok)
    assert reward.prompts == [question_prompt(q, tok) for q in items]
    p = reward.prompts[0]
    assert p[0] == tok.bos_id and p[-1] == tok.assistant_id
    assert items[0].question in tok.decode(p)


def test_adapter_rewards_follow_each_row_s_own_question(items, tok):
    G = 3
    reward = AnswerReward(items, tok)
    assert len({len(p) for p in reward.prompts}) > 1  # left padding is exercised
    rows = [p for p in reward.prompts for _ in range(G)]
    right = [answer_ids(tok, q.answer) for q in items for _ in range(G)]
    assert reward(*batch(tok, rows, right)).tolist() == [1.0] * len(rows)
    # every row answered with another question's answer: 0 unless the answers coincide
    shift = items[1:] + items[:1]
    wrong = [answer_ids(tok, o.answer) for o in shift for _ in range(G)]
    expected = [float(o.answer == q.answer) for q, o in zip(items, shift) for _ in range(G)]
    assert expected.count(0.0) > len(expected) // 2
    assert reward(*batch(tok, rows, wrong)).tolist() == expected


def test_shuffled_answers_mutation_is_caught(items, tok):
    "The check above fails on an adapter whose table pairs prompts with shuffled answers."
    reward = AnswerReward(items, tok)
    answers = [q.answer for q in items]
    random.Random(1).shuffle(answers)
    assert answers != [q.answer for q in items]
    reward.answers = {tuple(p): a for p, a in zip(reward.prompts, answers)}
    right = [answer_ids(tok, q.answer) for q in items]
    assert reward(*batch(tok, reward.prompts, right)).tolist() != [1.0] * len(items)


def forced_sampler(monkeypatch, plan):
    "Make the decoding loop emit `plan[i][t]` in row i at step t, whatever the model says."
    state = {"t": 0}

    def fake(logits, temperature, *args):
        t = state["t"]
        state["t"] += 1
        return torch.tensor([row[t] if t < len(row) else row[-1] for row in plan])

    monkeypatch.setattr(generate_module, "_sample", fake)
    return state


def test_grpo_rollout_gets_rewards_aligned_with_its_questions(items, tok, monkeypatch):
    "Through GRPOTrainer.rollout: rows of question i are scored against question i's answer."
    G, qs = 4, items[:5]
    reward = AnswerReward(qs, tok)
    cfg = GRPOConfig(num_generations=G, mini_batch_size=G * len(qs), max_new_tokens=4)
    tr = GRPOTrainer(tiny_model(tok), None, reward, cfg, eos_id=tok.end_id, pad_id=tok.pad_id)
    # within each group: right, wrong (another question's answer), right, wrong
    other = {q.answer: next(o.answer for o in items if o.answer != q.answer) for q in qs}
    plan = [answer_ids(tok, q.answer if g % 2 == 0 else other[q.answer]) for q in qs for g in range(G)]
    forced_sampler(monkeypatch, plan)
    ro = tr.rollout(reward.prompts)
    assert ro.rewards.tolist() == [1.0, 0.0] * (G // 2) * len(qs)
    # every group has a spread, so every right answer has a positive advantage
    assert ((ro.advantages > 0) == (ro.rewards > 0)).all()
    # the prompt of row i is question i // G's
    for i, row in enumerate(ro.prompt_ids.tolist()):
        assert row[len(row) - len(reward.prompts[i // G]):] == reward.prompts[i // G]


def test_adapter_bad_inputs(items, tok):
    with pytest.raises(ValueError, match="non-empty list of QAItems"):
        AnswerReward([], tok)
    with pytest.raises(ValueError, match="non-empty list of QAItems"):
        AnswerReward(items[0], tok)
    with pytest.raises(ValueError, match="must hold QAItems"):
        AnswerReward(items + ["red"], tok)
    clash = QAItem(items[0].story, items[0].question, items[0].answer + "x", items[0].kind)
    with pytest.raises(ValueError, match="different answers"):
        AnswerReward([items[0], clash], tok)
    reward = AnswerReward(items[:2], tok)
    stranger = question_prompt(items[3], tok)
    with pytest.raises(ValueError, match="not one of this reward's questions"):
        reward(*batch(tok, [stranger], [answer_ids(tok, "red")]))


# ---- sampling, KL, the trainer's configuration and the preset

def test_sample_answers_counts_and_zero_kl_against_itself(items, tok):
    m = tiny_model(tok)
    s = sample_answers(m, tok, items[:3], m, n=4, seed=0)
    assert s.n == 4 and len(s.correct) == 3 and all(0 <= c <= 4 for c in s.correct)
    assert s.kl == pytest.approx(0.0, abs=1e-6)
    a, b = randomize_(tiny_model(tok), seed=1), randomize_(tiny_model(tok), seed=2)
    other = sample_answers(a, tok, items[:3], b, n=8, seed=0)
    assert sample_answers(a, tok, items[:3], n=8, seed=0).correct == other.correct
    assert sample_answers(a, tok, items[:3], n=8, seed=0).kl is None  # no reference
    assert other.kl > 0.1  # two different models far from uniform: a clearly positive KL
    with pytest.raises(ValueError, match="n must be a positive integer"):
        sample_answers(m, tok, items[:3], n=0)


def test_sample_answers_counts_forced_right_answers(items, tok, monkeypatch):
    qs, n = items[:3], 4
    forced_sampler(monkeypatch, [answer_ids(tok, q.answer) for q in qs for _ in range(n)])
    m = tiny_model(tok)
    s = sample_answers(m, tok, qs, n=n, seed=0)
    assert s.correct == [n] * len(qs) and s.pass_at(1) == 1.0


def test_question_batches_draw_distinct_training_prompts(items, tok):
    reward = AnswerReward(items, tok)
    draw = question_batches(reward, 4, seed=0)
    a, b = draw(0), draw(1)
    assert len(a) == 4 and len({tuple(p) for p in a}) == 4
    assert all(p in reward.prompts for p in a + b)
    assert question_batches(reward, 4, seed=0)(0) == a  # a seed gives the same stream


def test_questions_per_kind_keeps_the_first_of_each_kind(items):
    from tinyllama.rlvr import questions_per_kind
    kept = questions_per_kind(items, 1)
    assert [q.kind for q in kept] == list(dict.fromkeys(q.kind for q in items))
    assert kept == [next(q for q in items if q.kind == k) for k in dict.fromkeys(q.kind for q in items)]
    assert questions_per_kind(items, None) == items


def test_preset_and_config():
    for profile in ("ci", "cpu", "gpu"):
        p = rlvr_preset(profile)
        assert p.n_samples >= 8  # pass@8 needs 8 samples per question
        cfg = rlvr_config(p)
        assert cfg.num_generations == p.num_generations >= 2
        assert cfg.mini_batch_size == p.num_generations * p.questions_per_step
    with pytest.raises(Exception):
        rlvr_preset("ci").steps = 3  # frozen
    with pytest.raises(ValueError, match="num_generations"):
        RLVRPreset(rlvr_preset("ci").sft, 10, 1, 1, num_generations=1, lr=1e-4)
