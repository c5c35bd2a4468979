"""Tests of tinyllama.dpo: sequence log-probabilities over the reply's tokens only (prompt and
padding contribute nothing, left padding changes nothing), the DPO loss (log 2 at π = π_ref, equal to
a brute-force per-pair computation, the direction of one gradient step), training, the preset's tie
to chapter 12's labels, and clear errors for bad input."""
import copy
import math

import pytest
import torch

from tinyllama.dpo import (DPOPreset, DPOTrainer, batched_logprobs, collate_pairs, dpo_loss, dpo_preset,
                           encode_pairs, pair_logprobs, run_dpo, sequence_logprobs, split_pairs,
                           train_dpo, implicit_accuracy, extra_val_pairs)
from tinyllama.feedback import feedback_preset
from tinyllama.generate import left_pad
from tinyllama.model import LLM, LLMConfig
from tinyllama.reward import PreferencePair, pad_batch

torch.set_num_threads(1)
V, PAD = 24, 0
LOG2 = math.log(2.0)


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    return LLM(LLMConfig(vocab_size=V, context_size=48, dim_emb=16, num_layers=2, num_heads=2,
                         num_kv_heads=1, ffd_hidden_dim=32))


def random_rows(n, seed=0):
    "n (prompt, chosen, rejected) token lists of different lengths; ids 1..V-1 (0 is PAD)."
    g = torch.Generator().manual_seed(seed)
    ids = lambda lo, hi: torch.randint(1, V, (int(torch.randint(lo, hi, (1,), generator=g)),),
                                       generator=g).tolist()
    return [(ids(1, 8), ids(1, 7), ids(1, 7)) for _ in range(n)]


def brute_force_logprob(model, prompt, reply):
    "log π(reply | prompt) from one unpadded row, token by token, in float64."
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reply]))[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(prompt) - 1 + t, y]) for t, y in enumerate(reply))


def batch_of(prompts, replies):
    p_ids, p_mask = left_pad(prompts, PAD)
    r_ids, r_mask = pad_batch(replies, PAD, "right")
    return p_ids, p_mask, r_ids, r_mask


# --- sequence log-probabilities -------------------------------------------------------------

def test_sequence_logprobs_sum_the_reply_tokens_only():
    model, rows = tiny_policy(), random_rows(6, seed=1)
    prompts, replies = [r[0] for r in rows], [r[1] for r in rows]
    with torch.no_grad():
        got = sequence_logprobs(model, *batch_of(prompts, replies))
    want = [brute_force_logprob(model, p, y) for p, y in zip(prompts, replies)]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-4)
    # the prompt's own tokens are not in the sum: counting them gives a different number
    with_prompt = [brute_force_logprob(model, p[:1], p[1:] + y) for p, y in zip(prompts, replies)]
    differs = [abs(a - b) > 1e-3 for a, b, p in zip(got.tolist(), with_prompt, prompts) if len(p) > 1]
    assert differs and all(differs)


def test_padding_tokens_contribute_nothing():
    model, rows = tiny_policy(), random_rows(5, seed=2)
    p_ids, p_mask, r_ids, r_mask = batch_of([r[0] for r in rows], [r[1] for r in rows])
    assert (p_mask == 0).any() and (r_mask == 0).any()  # both kinds of padding are there
    with torch.no_grad():
        base = sequence_logprobs(model, p_ids, p_mask, r_ids, r_mask)
        for fill in (5, 17, V - 1):
            junk = lambda ids, m: torch.where(m.bool(), ids, fill)
            other = sequence_logprobs(model, junk(p_ids, p_mask), p_mask, junk(r_ids, r_mask), r_mask)
            assert torch.allclose(base, other, atol=1e-5)
        # more padding columns after every reply change nothing either
        wide = sequence_logprobs(model, p_ids, p_mask, torch.nn.functional.pad(r_ids, (0, 4), value=9),
                                 torch.nn.functional.pad(r_mask, (0, 4)))
    assert torch.allclose(base, wide, atol=1e-5)


def test_left_padding_does_not_change_the_result():
    model = tiny_policy(seed=3)
    short, long_ = ([1, 2, 3], [4, 5, 2]), ([6, 7, 8, 9, 10, 11, 12], [13, 2])
    with torch.no_grad():
        alone = sequence_logprobs(model, *batch_of([short[0]], [short[1]]))
        together = sequence_logprobs(model, *batch_of([short[0], long_[0]], [short[1], long_[1]]))
    assert torch.allclose(alone, together[:1], atol=1e-5)


def assert_brute_force(model, rows, c, r):
    "The chosen and rejected log-probabilities equal the row-by-row brute force."
    want_c = [brute_force_logprob(model, p, y) for p, y, _ in rows]
    want_r = [brute_force_logprob(model, p, y) for p, _, y in rows]
    assert torch.allclose(c.double(), torch.tensor(want_c, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(r.double(), torch.tensor(want_r, dtype=torch.float64), atol=1e-4)


def test_pair_logprobs_scores_chosen_then_rejected():
    model, rows = tiny_policy(), random_rows(4, seed=4)
    with torch.no_grad():
        c, r = pair_logprobs(model, collate_pairs(rows, PAD))
    assert_brute_force(model, rows, c, r)
    bc, br = batched_logprobs(model, rows, PAD, batch_size=3)  # in batches of 3 and 1
    assert torch.allclose(bc, c, atol=1e-5) and torch.allclose(br, r, atol=1e-5)


def test_a_batch_of_long_prompts_and_long_replies_fits_the_context():
    # each row fits the context (48), but the longest prompt plus the longest reply (30 + 40)
    # does not: the batch must still be scored, each row exactly as alone
    model = tiny_policy(seed=7)
    g = torch.Generator().manual_seed(7)
    ids = lambda n: torch.randint(1, V, (n,), generator=g).tolist()
    rows = [(ids(30), ids(10), ids(18)), (ids(2), ids(40), ids(46)), (ids(12), ids(5), ids(36))]
    assert all(len(p) + len(y) <= 48 for p, a, b in rows for y in (a, b))
    assert max(len(r[0]) for r in rows) + max(len(r[1]) for r in rows) > 48
    with torch.no_grad():
        c, r = pair_logprobs(model, collate_pairs(rows, PAD))
    assert_brute_force(model, rows, c, r)


# --- the loss ---------------------------------------------------------------------------------

def test_loss_is_exactly_log_2_when_policy_equals_reference():
    policy, rows = tiny_policy(), random_rows(8, seed=5)
    ref = copy.deepcopy(policy)
    batch = collate_pairs(rows, PAD)
    c, r = pair_logprobs(policy, batch)
    with torch.no_grad():
        rc, rr = pair_logprobs(ref, batch)
    for beta in (0.01, 0.1, 2.0):
        loss, stats = dpo_loss(c, r, rc, rr, beta)
        assert abs(loss.item() - LOG2) < 1e-6
        assert stats["rewards/accuracies"].item() == 0.5 and stats["rewards/margins"].item() == 0
    g = torch.Generator().manual_seed(0)
    x, y = -50 * torch.rand(16, generator=g), -50 * torch.rand(16, generator=g)
    assert dpo_loss(x, y, x, y, 0.3)[0].item() == pytest.approx(LOG2, abs=1e-7)


def test_loss_equals_a_brute_force_per_pair_computation():
    g = torch.Generator().manual_seed(1)
    c, r, rc, rr = (-80 * torch.rand(12, generator=g, dtype=torch.float64) for _ in range(4))
    beta = 0.2
    want = sum(-math.log(1 / (1 + math.exp(-beta * ((a - b) - (d - e)))))
               for a, d, b, e in zip(c.tolist(), r.tolist(), rc.tolist(), rr.tolist())) / 12
    loss, stats = dpo_loss(c, r, rc, rr, beta)
    assert loss.item() == pytest.approx(want, rel=1e-9)
    margins = [beta * ((a - b) - (d - e)) for a, d, b, e in zip(c.tolist(), r.tolist(), rc.tolist(), rr.tolist())]
    assert stats["rewards/margins"].item() == pytest.approx(sum(margins) / 12, rel=1e-9)
    assert stats["rewards/accuracies"].item() == pytest.approx(sum(m > 0 for m in margins) / 12)
    assert stats["rewards/chosen"].item() == pytest.approx(beta * (c - rc).mean().item(), rel=1e-9)


def test_loss_through_the_model_equals_a_brute_force_per_pair_computation():
    policy, ref, rows, beta = tiny_policy(1), tiny_policy(2), random_rows(5, seed=6), 0.5
    c, r = pair_logprobs(policy, collate_pairs(rows, PAD))
    rc, rr = batched_logprobs(ref, rows, PAD)
    loss, _ = dpo_loss(c, r, rc, rr, beta)
    terms = []
    for p, yc, yr in rows:
        h = (brute_force_logprob(policy, p, yc) - brute_force_logprob(ref, p, yc)) - (
            brute_force_logprob(policy, p, yr) - brute_force_logprob(ref, p, yr))
        terms.append(math.log1p(math.exp(-beta * h)))  # −log σ(βh)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)


def test_loss_is_finite_for_huge_margins():
    c = torch.tensor([-1.0, -3000.0])
    r = torch.tensor([-3000.0, -1.0])
    loss, _ = dpo_loss(c, r, torch.zeros(2), torch.zeros(2), 1.0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(2999 / 2, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_gradient_step_raises_the_chosen_margin_and_lowers_the_rejected(seed):
    policy, rows = tiny_policy(seed), random_rows(1, seed=10 + seed)
    ref = copy.deepcopy(policy)
    batch = collate_pairs(rows, PAD)
    with torch.no_grad():
        rc, rr = pair_logprobs(ref, batch)
    c, r = pair_logprobs(policy, batch)
    loss, _ = dpo_loss(c, r, rc, rr, beta=0.1)
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.5 * p.grad
        c2, r2 = pair_logprobs(policy, batch)
    assert (c2 - rc).item() > 1e-4  # the chosen reply's log π − log π_ref went up
    assert (r2 - rr).item() < -1e-4  # the rejected one's went down
    loss2, _ = dpo_loss(c2, r2, rc, rr, beta=0.1)
    assert loss2.item() < LOG2


def test_the_reference_gets_no_gradient():
    c, r = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    rc, rr = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    dpo_loss(c, r, rc, rr, 0.1)[0].backward()
    assert rc.grad is None and rr.grad is None and c.grad is not None


# --- training, data, preset -------------------------------------------------------------------

@pytest.fixture(scope="module")
def story_tokenizer():
    from tinyllama.data import default_world
    from tinyllama.tokenizer import train_tokenizer

    texts = [s.text for s in default_world().sample(300, seed="test-dpo")]
    return train_tokenizer(texts, vocab_size=400, num_threads=1)


def story_pairs(n, seed):
    from tinyllama.reward import story_preference_pairs

    return [PreferencePair("Write a story.", p.chosen, p.rejected)
            for p in story_preference_pairs(n, seed=seed)]


def test_train_dpo_learns_the_labels_and_leaves_the_reference_alone(story_tokenizer):
    tok = story_tokenizer
    torch.manual_seed(0)
    ref = LLM(LLMConfig(vocab_size=tok.vocab_size, context_size=128, dim_emb=32, num_layers=1,
                        num_heads=2, num_kv_heads=1, ffd_hidden_dim=64))
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    policy, pairs = copy.deepcopy(ref), story_pairs(24, seed=0)
    assert implicit_accuracy(policy, ref, tok, pairs) == 0.5  # π = π_ref: all ties
    hist = train_dpo(policy, ref, tok, pairs, steps=30, batch_size=8, lr=3e-3, beta=0.1,
                     eval_pairs=pairs[:8], eval_every=10, progress=False)
    assert len(hist) == 30 and abs(hist[0]["loss"] - LOG2) < 1e-5
    assert hist[-1]["eval/accuracy"] >= 0.9 and hist[-1]["loss"] < 0.5
    assert [s["step"] for s in hist if "eval/loss" in s] == [9, 19, 29]
    assert implicit_accuracy(policy, ref, tok, pairs) >= 0.9
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in before.items())


def story_ref(tok, ctx=128):
    torch.manual_seed(0)
    return LLM(LLMConfig(vocab_size=tok.vocab_size, context_size=ctx, dim_emb=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, ffd_hidden_dim=64))


def test_dpo_trainer_steps_keep_a_history_and_check_the_held_out_pairs(story_tokenizer):
    tok, ref = story_tokenizer, story_ref(story_tokenizer)
    pairs, held = story_pairs(16, seed=0), story_pairs(6, seed=5)
    trainer = DPOTrainer(copy.deepcopy(ref), ref, tok, pairs, beta=0.1, lr=3e-3, eval_pairs=held,
                         eval_every=3)
    start = trainer.evaluate(held)
    assert start["eval/accuracy"] == 0.5 and abs(start["eval/loss"] - LOG2) < 1e-6  # π = π_ref
    s = trainer.step([0, 1, 2, 3])
    assert s["step"] == 0 and abs(s["loss"] - LOG2) < 1e-5 and "eval/loss" not in s
    assert trainer.history == [s] and trainer.n_steps == 1
    assert {"grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies"} <= s.keys()
    order = trainer.batches(8, 4, seed=0)
    assert sorted(sum(order[:4], [])) == list(range(16))  # an epoch sees every pair once
    trainer.train(lambda n: order[n], 4, progress=False)  # steps 2..5: checks after 3 and 5
    assert [h["step"] for h in trainer.history if "eval/accuracy" in h] == [2, 4]
    assert trainer.history[-1]["loss"] < LOG2
    assert trainer.evaluate(held) == {k: trainer.history[-1][k] for k in ("eval/loss", "eval/accuracy")}
    stopped = trainer.train(lambda n: order[n % 8], 10, callback=lambda st: True, progress=False)
    assert len(stopped) == 1 and trainer.n_steps == 6  # a callback returning True stops
    with pytest.raises(ValueError, match="batch is empty"):
        trainer.step([])


def test_held_out_checks_score_the_reference_once_per_list_of_pairs(story_tokenizer, monkeypatch):
    import tinyllama.dpo as dpo

    tok, ref = story_tokenizer, story_ref(story_tokenizer)
    held = story_pairs(6, seed=5)
    trainer = DPOTrainer(copy.deepcopy(ref), ref, tok, story_pairs(8, seed=0), eval_pairs=held)
    calls = []
    real = dpo.batched_logprobs
    monkeypatch.setattr(dpo, "batched_logprobs", lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    for _ in range(3):
        trainer.evaluate(held)
    assert calls.count(ref) == 1 and calls.count(trainer.policy) == 3


def test_train_dpo_is_the_trainer_s_steps(story_tokenizer):
    tok, ref = story_tokenizer, story_ref(story_tokenizer)
    pairs, held = story_pairs(12, seed=0), story_pairs(4, seed=5)
    hist = train_dpo(copy.deepcopy(ref), ref, tok, pairs, steps=5, batch_size=4, lr=3e-3, beta=0.2,
                     eval_pairs=held, eval_every=2, seed=3, progress=False)
    trainer = DPOTrainer(copy.deepcopy(ref), ref, tok, pairs, beta=0.2, lr=3e-3, eval_pairs=held,
                         eval_every=2)
    order = trainer.batches(5, 4, seed=3)
    for idx in order[:4]:
        trainer.step(idx)
    trainer.last_step = 5  # what train sets: a check after the last step
    trainer.step(order[4])
    assert [h["step"] for h in hist if "eval/loss" in h] == [1, 3, 4]
    assert len(hist) == len(trainer.history) == 5
    for a, b in zip(hist, trainer.history):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a)


def test_encode_pairs_uses_the_chat_template_and_fits_the_context(story_tokenizer):
    from tinyllama.feedback import chat_prompt_ids

    tok, pairs = story_tokenizer, story_pairs(2, seed=1)
    rows = encode_pairs(tok, pairs, context_size=128)
    assert rows[0][0] == chat_prompt_ids(tok, ["Write a story."])[0]
    assert rows[0][1] == (tok.encode(pairs[0].chosen) + [tok.end_id])[: 128 - len(rows[0][0])]
    assert all(len(p) + len(y) <= 128 for p, a, b in rows for y in (a, b))
    short = encode_pairs(tok, pairs, context_size=len(rows[0][0]) + 5)
    assert all(len(y) == 5 for _, a, b in short for y in (a, b))


def test_pairs_whose_prompts_differ_in_length_train_at_a_small_context(story_tokenizer):
    # a short prompt leaves a long reply room, a long prompt a short one: encode_pairs cuts
    # each reply after its own prompt, and every batch of them must fit the context
    tok, ctx = story_tokenizer, 64
    long_request = "Write a story about a girl, a dog, a big red ball and a day by the sea, please."
    pairs = [PreferencePair(prompt, p.chosen, p.rejected) for prompt, p in
             zip(["Write a story.", long_request] * 4, story_pairs(8, seed=3))]
    rows = encode_pairs(tok, pairs, ctx)
    assert all(len(p) + len(y) <= ctx for p, a, b in rows for y in (a, b))
    assert max(len(r[0]) for r in rows) + max(len(r[1]) for r in rows) > ctx
    torch.manual_seed(0)
    ref = LLM(LLMConfig(vocab_size=tok.vocab_size, context_size=ctx, dim_emb=16, num_layers=1,
                        num_heads=2, num_kv_heads=1, ffd_hidden_dim=32))
    c, r = batched_logprobs(ref, rows, tok.pad_id)
    want = [brute_force_logprob(ref, p, a) for p, a, _ in rows]
    assert torch.allclose(c.double(), torch.tensor(want, dtype=torch.float64), atol=1e-3)
    hist = train_dpo(copy.deepcopy(ref), ref, tok, pairs, steps=2, batch_size=8, eval_pairs=pairs,
                     eval_every=1, progress=False)
    assert abs(hist[0]["loss"] - LOG2) < 1e-5 and hist[-1]["eval/accuracy"] >= 0


def test_extra_held_out_pairs_come_from_fresh_requests_labelled_apart(story_tokenizer, tmp_path):
    from tinyllama.feedback import LabelStore, ScriptedLabeler, story_requests

    tok, labeler = story_tokenizer, ScriptedLabeler()
    drawn = list(dict.fromkeys(story_requests(200, seed="0/dpo-val")))  # distinct, in order
    used = drawn[:4]  # as if labelled for training, or the verdict's
    got = extra_val_pairs(story_ref(tok, ctx=160), tok, 10, used, labeler, tmp_path, 24, seed=0)
    stored = LabelStore(tmp_path / "labels-val.jsonl")
    assert not (tmp_path / "labels.jsonl").exists()  # the training labels' file is left alone
    asked = {d["prompt"] for d in stored.decisions}  # every pair labelled, tie or not
    assert got == stored.preference_pairs()
    assert asked and asked <= set(drawn[4:14]) and all(p.prompt in asked for p in got)
    assert len(stored.decisions) == len(asked)  # each fresh request once
    assert extra_val_pairs(story_ref(tok), tok, 0, used, labeler, tmp_path / "none") == []


def test_split_pairs_holds_out_a_share_and_keeps_every_pair():
    pairs = story_pairs(30, seed=2)
    train, val = split_pairs(pairs, 1 / 3, seed=0)
    assert len(val) == 10 and sorted(map(repr, train + val)) == sorted(map(repr, pairs))
    assert split_pairs(pairs, 1 / 3, seed=0) == (train, val)  # the same seed, the same split


@pytest.mark.parametrize("profile", ["ci", "cpu", "gpu"])
def test_the_preset_takes_chapter_12_s_labels(profile):
    p, fb = dpo_preset(profile), feedback_preset(profile)
    assert isinstance(p, DPOPreset)
    assert (p.n_label, p.n_heldout, p.max_new_tokens) == (fb.n_label, fb.n_heldout, fb.max_new_tokens)
    assert p.val_fraction == fb.rm_val_fraction and p.min_pairs == fb.min_pairs
    assert p.n_extra_val == (0 if profile == "ci" else 150)  # ci stays fast
    with pytest.raises(Exception):
        p.steps = 1  # frozen


# --- bad input --------------------------------------------------------------------------------

def test_bad_input_gives_a_clear_value_error(story_tokenizer):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="1-d tensor"):
        dpo_loss(x[None], x[None], x[None], x[None])
    with pytest.raises(ValueError, match="one log-probability per pair"):
        dpo_loss(x, x[:2], x, x)
    for beta in (0, -1.0, True, "0.1"):
        with pytest.raises(ValueError, match="beta must be a number > 0"):
            dpo_loss(x, x, x, x, beta)
    model = tiny_policy()
    p_ids, p_mask, r_ids, r_mask = batch_of([[1, 2], [3]], [[4, 5], [6]])
    with pytest.raises(ValueError, match="left-padded"):
        sequence_logprobs(model, p_ids.flip(1), p_mask.flip(1), r_ids, r_mask)
    with pytest.raises(ValueError, match="right-padded"):
        sequence_logprobs(model, p_ids, p_mask, r_ids.flip(1), r_mask.flip(1))
    with pytest.raises(ValueError, match="shape of its ids"):
        sequence_logprobs(model, p_ids, p_mask[:, 1:], r_ids, r_mask)
    with pytest.raises(ValueError, match="one reply per prompt"):
        sequence_logprobs(model, p_ids, p_mask, r_ids[:1], r_mask[:1])
    with pytest.raises(ValueError, match="integers"):
        sequence_logprobs(model, p_ids.float(), p_mask, r_ids, r_mask)
    with pytest.raises(ValueError, match="batch, tokens"):
        sequence_logprobs(model, p_ids[0], p_mask[0], r_ids, r_mask)
    tok, pairs = story_tokenizer, story_pairs(2, seed=0)
    with pytest.raises(ValueError, match="wrap a single pair in a list"):
        encode_pairs(tok, pairs[0], 128)
    with pytest.raises(ValueError, match="empty"):
        encode_pairs(tok, [], 128)
    with pytest.raises(ValueError, match=r"pairs\[1\] is a tuple"):
        encode_pairs(tok, [pairs[0], ("p", "a", "b")], 128)
    with pytest.raises(ValueError, match="context_size"):
        encode_pairs(tok, pairs, 3)
    ref = LLM(LLMConfig(vocab_size=tok.vocab_size, context_size=128, dim_emb=16, num_layers=1,
                        num_heads=2, num_kv_heads=1, ffd_hidden_dim=32))
    with pytest.raises(ValueError, match="same object"):
        train_dpo(ref, ref, tok, pairs, steps=1, progress=False)
    for kw, what in ((dict(steps=0), "steps"), (dict(batch_size=1.5), "batch_size"),
                     (dict(lr=0), "lr"), (dict(beta=-1), "beta"), (dict(eval_every=0), "eval_every")):
        with pytest.raises(ValueError, match=what):
            train_dpo(copy.deepcopy(ref), ref, tok, pairs, progress=False, **kw)
    with pytest.raises(ValueError, match="must be an LLM"):
        train_dpo(torch.nn.Linear(2, 2), ref, tok, pairs, progress=False)
    with pytest.raises(ValueError, match="must be an LLM"):
        run_dpo(torch.nn.Linear(2, 2), tok, "/tmp")
    with pytest.raises(ValueError, match="same object"):
        DPOTrainer(ref, ref, tok, pairs)
    for kw, what in ((dict(lr=0), "lr"), (dict(beta=-1), "beta"), (dict(eval_every=0), "eval_every")):
        with pytest.raises(ValueError, match=what):
            DPOTrainer(copy.deepcopy(ref), ref, tok, pairs, **kw)
    with pytest.raises(ValueError, match="wrap a single pair in a list"):
        DPOTrainer(copy.deepcopy(ref), ref, tok, pairs).evaluate(pairs[0])
    with pytest.raises(ValueError, match="profile"):
        dpo_preset("tpu")
