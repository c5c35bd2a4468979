"""Tests of tinyllama.reward: the golden copy reward on hand-made rows and against a brute-force
reference, the Bradley–Terry loss against its formula, reading the score at the last real token
(left/right padding), where the gradient goes, training on a small synthetic preference set, the
story-world preference pairs, and plain-words errors for bad input."""
import math
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tinyllama.data import default_world
from tinyllama.generate import left_pad
from tinyllama.model import LLM, LLMConfig
from tinyllama.train import lr_at
from tinyllama.reward import (GoldenRewardModel, PreferencePair, RewardModel, bradley_terry_loss, copy_prompts,
                              copy_task_words, encode_completion, pad_batch, pair_accuracy, score_pairs,
                              score_texts,
                              split_story, story_preference_pairs, train_reward_model)

EOS, PAD, BOS = 2, 3, 1
W = [10, 11, 12]  # a three-token word


def golden():
    return GoldenRewardModel(eos_id=EOS, pad_id=PAD)


# ---------------------------------------------------------------- golden reward: hand-made rows

@pytest.mark.parametrize("response, expected", [
    (W + [EOS], [1, 1, 1, 1]),  # full copy, EOS included: the maximum, len(word) + 1
    ([13, 11, 12, EOS], [0, 0, 0, 0]),  # first token missed: nothing after it counts
    ([10, 11, 99, EOS], [1, 1, 0, 0]),  # late miss
    ([10, EOS, PAD, PAD], [1, 0, 0, 0]),  # early EOS: stops the copy short
    (W + [10], [1, 1, 1, 0]),  # the word without EOS: the copy is not finished
    (W + [EOS, 10, 11], [1, 1, 1, 1, 0, 0]),  # tokens after the copied EOS earn nothing
    ([10, 11], [1, 1]),  # a response shorter than the target
    ([PAD, PAD, PAD], [0, 0, 0]),  # padding never earns
])
def test_golden_hand_made_rows(response, expected):
    r = golden().rewards([W + [EOS]], [response])
    assert r.dtype == torch.float32 and r.shape == (1, len(response))
    assert r[0].tolist() == expected
    assert golden().score([W + [EOS]], [response]).tolist() == [sum(expected)]
    assert golden().exact_copy([W + [EOS]], [response]).tolist() == [sum(expected) == len(W) + 1]


def test_golden_padding_left_prompts_right_responses():
    "A batch of left-padded prompts and right-padded responses gives each row what it gets alone."
    g = golden()
    prompts = [[10, 11, 12, EOS], [20, EOS], [30, 31, 32, 33, 34, EOS]]
    responses = [[10, 11, 12, EOS], [20, 21], [30, 31, 32, 33, 34, EOS, 7]]
    p, _ = pad_batch(prompts, PAD, "left")
    r, _ = pad_batch(responses, PAD, "right")
    assert p[1].tolist()[:4] == [PAD] * 4 and r[0].tolist()[-3:] == [PAD] * 3  # really padded
    batch = g.rewards(p, r)
    for i, (pi, ri) in enumerate(zip(prompts, responses)):
        alone = g.rewards(torch.tensor([pi]), torch.tensor([ri]))[0]
        assert batch[i, :len(ri)].tolist() == alone.tolist()
        assert batch[i, len(ri):].sum() == 0  # padding earns nothing
    assert g.score(p, r).tolist() == [4, 1, 6]
    assert g.exact_copy(p, r).tolist() == [True, False, True]
    assert torch.equal(g(prompts, responses), batch)  # lists are padded the same way


def test_golden_bos_in_prompt_is_not_part_of_the_word():
    g = GoldenRewardModel(EOS, PAD, bos_id=BOS)
    assert g.rewards([[BOS] + W + [EOS]], [W + [EOS]])[0].tolist() == [1, 1, 1, 1]


def reference_rewards(prompt, response):
    "Brute force: position t earns 1 if response[:t+1] equals the target's first t+1 tokens."
    target = [t for t in prompt if t != PAD]
    return [1.0 if t < len(target) and response[:t + 1] == target[:t + 1] else 0.0 for t in range(len(response))]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(4, 7), min_size=1, max_size=5),
                          st.lists(st.integers(2, 7), min_size=1, max_size=7)), min_size=1, max_size=4))
def test_golden_matches_brute_force(rows):
    "Small alphabets make partial copies frequent; each row is compared with the brute-force rule."
    prompts = [w + [EOS] for w, _ in rows]
    responses = [r for _, r in rows]
    got = golden().rewards(prompts, responses)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        assert got[i, :len(r)].tolist() == reference_rewards(p, r)


@pytest.mark.parametrize("prompts, words", [
    ([[10, 11]], "followed by EOS"),  # no EOS
    ([[EOS]], "followed by EOS"),  # no word
    ([[PAD, PAD]], "followed by EOS"),  # nothing at all
])
def test_golden_bad_prompts(prompts, words):
    with pytest.raises(ValueError, match=words):
        golden().rewards(prompts, [[10]])


def test_golden_bad_arguments():
    with pytest.raises(ValueError, match="distinct"):
        GoldenRewardModel(eos_id=2, pad_id=2)
    with pytest.raises(ValueError, match="one response per prompt"):
        golden().rewards([W + [EOS]], [[10], [11]])
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        golden().rewards(torch.tensor(W + [EOS]), torch.tensor([10]))


# ---------------------------------------------------------------- copy-task words and prompts

def test_copy_task_words_are_distinct_disjoint_and_reproducible():
    train, held = copy_task_words(300, seed=5, n_heldout=100, min_len=2, max_len=4, alphabet="abcdef")
    assert len(train) == 300 and len(held) == 100
    assert len(set(train)) == 300 and len(set(held)) == 100 and not set(train) & set(held)
    assert all(2 <= len(w) <= 4 and set(w) <= set("abcdef") for w in train + held)
    assert (train, held) == copy_task_words(300, seed=5, n_heldout=100, min_len=2, max_len=4, alphabet="abcdef")
    assert train != copy_task_words(300, seed=6, n_heldout=100, min_len=2, max_len=4, alphabet="abcdef")[0]


@pytest.mark.parametrize("kw, words", [
    (dict(n=-1), "non-negative"), (dict(n=10, min_len=0), "min_len"), (dict(n=10, min_len=5, max_len=3), "min_len"),
    (dict(n=10, alphabet=""), "alphabet"), (dict(n=10, alphabet="aa"), "alphabet"),
    (dict(n=100, min_len=1, max_len=1, alphabet="ab"), "too many"),
])
def test_copy_task_words_bad_input(kw, words):
    with pytest.raises(ValueError, match=words):
        copy_task_words(**kw)


class CharTokenizer:
    "A character tokenizer with tinyllama's special ids: enough for these tests, and trained in no time."
    unk_id, bos_id, eos_id, pad_id = 0, BOS, EOS, PAD
    chars = "abcdefghijklmnopqrstuvwxyz !?.,"
    vocab_size = 4 + len(chars)
    def encode(self, text): return [4 + self.chars.index(c) for c in text]


def test_copy_prompts_end_with_eos_and_score_full_marks():
    tok = CharTokenizer()
    prompts = copy_prompts(["abc", "zz"], tok)
    assert prompts == [tok.encode("abc") + [EOS], tok.encode("zz") + [EOS]]
    assert copy_prompts(["abc"], tok, bos=True) == [[BOS] + tok.encode("abc") + [EOS]]
    assert golden().exact_copy(prompts, prompts).all()
    with pytest.raises(ValueError, match="not one string"):
        copy_prompts("abc", tok)
    with pytest.raises(ValueError, match="non-empty"):
        copy_prompts(["abc", ""], tok)


# ---------------------------------------------------------------- Bradley–Terry loss

def test_bradley_terry_loss_matches_formula():
    rc, rr = torch.tensor([2.0, -1.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 0.5, 30.0])
    by_hand = [-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(rc.tolist(), rr.tolist())]
    assert math.isclose(bradley_terry_loss(rc, rr).item(), sum(by_hand) / 4, rel_tol=1e-6)
    assert math.isclose(bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item(), math.log(2), rel_tol=1e-6)
    # swapping chosen and rejected turns log σ(d) into log σ(-d): the two losses differ by the mean margin
    d = (rc - rr)
    assert math.isclose((bradley_terry_loss(rr, rc) - bradley_terry_loss(rc, rr)).item(), d.mean().item(), rel_tol=1e-5)


def test_bradley_terry_loss_bad_input():
    with pytest.raises(ValueError, match="one rejected score per chosen"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))


# ---------------------------------------------------------------- RewardModel: where the score is read

SMALL = dict(vocab_size=40, context_size=32, dim_emb=32, num_layers=2, num_heads=4, num_kv_heads=2, ffd_hidden_dim=48)


def small_rm(seed=0, **kw):
    torch.manual_seed(seed)
    return RewardModel(LLMConfig(**SMALL), **kw).eval()


def test_score_is_read_at_last_real_token_whatever_the_padding():
    rm = small_rm()
    row = [BOS, 7, 8, 9, 10, EOS]
    alone = rm(torch.tensor([row]))
    right, mask_r = pad_batch([row, [5] * 9], PAD, "right")
    left, mask_l = pad_batch([row, [5] * 9], PAD, "left")
    right[0, len(row):] = torch.tensor([11, 12, 13])  # garbage after the row: masked, so it must not matter
    torch.testing.assert_close(rm(right, mask_r)[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm(left, mask_l)[0], alone[0], atol=1e-5, rtol=1e-5)
    # a different last token changes the score (the read position matters)
    assert not torch.allclose(rm(torch.tensor([row[:-1]])), alone)
    # with pad_id the mask is derived from the ids
    rm_pad = small_rm(pad_id=PAD)
    torch.testing.assert_close(rm_pad(pad_batch([row, [5] * 9], PAD, "right")[0])[0], alone[0], atol=1e-5, rtol=1e-5)


def test_score_equals_head_of_trunk_hidden_state():
    "The score is score_head applied to the trunk's final hidden state at the last position."
    rm = small_rm()
    x = torch.tensor([[4, 5, 6, 7]])
    h = rm.trunk(x)  # lm_head is the identity: hidden states (1, 4, d)
    assert h.shape == (1, 4, SMALL["dim_emb"])
    torch.testing.assert_close(rm(x), rm.score_head(h[:, -1]).squeeze(-1))


def test_row_without_real_tokens_is_a_clear_error():
    rm = small_rm()
    ids = torch.tensor([[4, 5, 6], [PAD, PAD, PAD]])
    with pytest.raises(ValueError, match=r"rows \[1\] have no non-padding token"):
        rm(ids, torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="no non-padding token"):
        small_rm(pad_id=PAD)(ids)
    with pytest.raises(ValueError, match="one mask entry per token"):
        rm(ids, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        rm(torch.tensor([4, 5, 6]))
    with pytest.raises(ValueError, match="LLMConfig"):
        RewardModel(dict(SMALL))


def test_gradient_flows_through_head_and_trunk_only():
    "From a pretrained LLM: every reward-model parameter learns; the source model gets no gradient and stays as it was."
    torch.manual_seed(1)
    llm = LLM(LLMConfig(**SMALL))
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    rm = RewardModel.from_llm(llm)
    for k, v in rm.trunk.state_dict().items():  # the trunk starts as the LLM (less its lm_head)
        assert torch.equal(v, before[k])
    assert not any("lm_head" in n for n, _ in rm.named_parameters())
    ids = torch.randint(4, 40, (4, 6))
    r = rm(ids)
    bradley_terry_loss(r[:2], r[2:]).backward()
    names = [n for n, _ in rm.named_parameters()]
    assert all(n.startswith("trunk.") or n.startswith("score_head.") for n in names)
    for n, p in rm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
    assert all(p.grad is None for p in llm.parameters())
    torch.optim.SGD(rm.parameters(), lr=0.1).step()
    assert all(torch.equal(v, before[k]) for k, v in llm.state_dict().items())
    assert not torch.equal(rm.trunk.layers[0].mlp.up_proj.weight, before["layers.0.mlp.up_proj.weight"])


# ---------------------------------------------------------------- training

def synthetic_pairs(n, seed):
    "The taste: a completion ending in '!' beats one ending in '?'; the rest of each text is random letters."
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
    return [PreferencePair(word(), " " + word() + "!", " " + word() + "?") for _ in range(n)]


def test_training_raises_held_out_accuracy():
    tok = CharTokenizer()
    torch.manual_seed(3)
    tiny = dict(SMALL, dim_emb=16, num_layers=1, num_heads=2, num_kv_heads=1, ffd_hidden_dim=32)
    rm = RewardModel(LLMConfig(**tiny), pad_id=PAD)
    train, held = synthetic_pairs(96, 0), synthetic_pairs(48, 1)
    before = pair_accuracy(rm, tok, held)
    history = train_reward_model(rm, tok, train, steps=20, batch_size=16, lr=1e-2, eval_pairs=held, eval_every=10,
                                 progress=False)
    after = pair_accuracy(rm, tok, held)
    assert [m["step"] for m in history] == list(range(1, 21))
    assert {"loss", "accuracy", "lr"} <= set(history[0]) and "eval_accuracy" not in history[0]
    assert "eval_accuracy" in history[9] and "eval_accuracy" in history[-1]
    assert history[-1]["eval_accuracy"] == pytest.approx(after)
    assert after >= 0.9 and after > before + 0.2, (before, after)
    assert sum(m["loss"] for m in history[-5:]) / 5 < 0.5 * math.log(2)
    rc, rr = score_pairs(rm, tok, held)
    assert rc.shape == rr.shape == (48,)


def test_training_follows_the_course_schedule():
    "One learning-rate schedule in the course: chapter 07's lr_at, warm-up over a tenth, cosine to lr/10."
    tok, rm = CharTokenizer(), small_rm()
    history = train_reward_model(rm, tok, synthetic_pairs(32, 0), steps=20, batch_size=8, lr=1e-3, progress=False)
    assert [m["lr"] for m in history] == [lr_at(s, 1e-3, 1e-4, 2, 20) for s in range(20)]
    assert history[1]["lr"] == 1e-3 and history[-1]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("rows", [[[5, 6, 2], [7, 2]], [[4], [], [1, 2, 3, 4]], [[9]]])
def test_pad_batch_is_left_pad_on_either_side(rows):
    if all(rows):  # chapter 08's padder takes no empty rows
        ids, mask = left_pad(rows, PAD)
        assert [torch.equal(a, b) for a, b in zip(pad_batch(rows, PAD, "left"), (ids, mask))] == [True, True]
    ids, mask = pad_batch(rows, PAD, "right")
    for row, r, m in zip(rows, ids.tolist(), mask.tolist()):
        assert r == row + [PAD] * (ids.shape[1] - len(row)) and m == [1] * len(row) + [0] * (ids.shape[1] - len(row))


def test_train_reward_model_bad_input():
    tok, rm = CharTokenizer(), small_rm()
    good = synthetic_pairs(4, 0)
    with pytest.raises(ValueError, match="non-empty list of PreferencePair"):
        train_reward_model(rm, tok, [], steps=1, progress=False)
    with pytest.raises(ValueError, match="not a PreferencePair"):
        train_reward_model(rm, tok, good + [("a", "b", "c")], steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_reward_model(rm, tok, good, steps=0, progress=False)
    with pytest.raises(ValueError, match="context_size=32"):
        train_reward_model(rm, tok, [PreferencePair("a" * 40, "b", "c")], steps=1, progress=False)
    with pytest.raises(ValueError, match="must be a string"):
        PreferencePair("a", None, "c")


# ---------------------------------------------------------------- story-world preference pairs

def test_story_pairs_follow_the_stated_taste():
    world = default_world()
    pairs = story_preference_pairs(40, seed=7, p_matched=0.5)
    assert pairs == story_preference_pairs(40, seed=7, p_matched=0.5)
    matched = 0
    for p in pairs:
        good, bad = world.parse(p.prompt + p.chosen), world.parse(p.prompt + p.rejected)
        assert good.ending == "happy" and bad.ending == "sad"
        assert split_story(good.text, good.hero)[0] == p.prompt  # both open with the same first sentence
        fields = ("home", "colour", "object", "place", "event")
        matched += all(good.get(f) == bad.get(f) for f in fields)
    assert 10 <= matched <= 35  # about half are matched (some unmatched ones agree by chance)
    unmatched = story_preference_pairs(40, seed=7, p_matched=0.0)
    assert sum(world.parse(p.prompt + p.chosen).event != world.parse(p.prompt + p.rejected).event for p in unmatched) > 10
    with pytest.raises(ValueError, match="p_matched"):
        story_preference_pairs(3, p_matched=2)


def test_encode_completion_frames_like_pretraining():
    tok = CharTokenizer()
    assert encode_completion(tok, "ab", " c") == [BOS] + tok.encode("ab c") + [EOS]


def test_a_text_longer_than_the_context_is_cut_to_its_first_tokens():
    "The speedrun's crash: a reply that re-tokenises longer than the reward model's context."
    tok = CharTokenizer()
    full = encode_completion(tok, "ab", " cdefgh")
    assert encode_completion(tok, "ab", " cdefgh", context_size=len(full)) == full  # fits: unchanged
    assert encode_completion(tok, "ab", " cdefgh", context_size=6) == full[:6]  # no EOS: unfinished
    with pytest.raises(ValueError, match="prompt alone fills"):
        encode_completion(tok, "abcdef", " g", context_size=6)


def test_scoring_and_training_cut_over_long_texts_instead_of_crashing():
    tok, rm = CharTokenizer(), small_rm()
    prompts, long = ["ab", "ab"], [" " + "c" * 60, " d"]  # 64 tokens framed, context 32
    scores = score_texts(rm, tok, prompts, long)
    cut = torch.tensor([encode_completion(tok, "ab", long[0])[:32]])
    assert scores[0].item() == pytest.approx(rm(cut, torch.ones_like(cut)).item(), abs=1e-5)
    pairs = [PreferencePair("ab", long[0], long[1])] * 4
    history = train_reward_model(rm, tok, pairs, steps=2, batch_size=2, progress=False)
    assert len(history) == 2 and score_pairs(rm, tok, pairs)[0].shape == (4,)


# ---------------------------------------------------------------- the scale of the scores

def test_normalize_gives_mean_0_std_1_keeps_ranking_and_survives_save_load(tmp_path):
    "Stiennon et al.'s normalisation: the reference samples score mean 0, std 1; no pair changes order."
    from tinyllama.reward import normalize_on_samples, score_texts
    tok, rm = CharTokenizer(), small_rm(pad_id=PAD)
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)  # raw scores far from mean 0, std 1
    pairs = synthetic_pairs(40, 5)
    prompts, texts = [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]
    raw = score_texts(rm, tok, prompts, texts)
    assert abs(raw.mean()) > 0.05 or abs(raw.std() - 1) > 0.05  # the test can fail: not yet normalised
    mean, std = normalize_on_samples(rm, tok, prompts, texts)
    assert (mean, std) == pytest.approx((raw.mean().item(), raw.std().item()), rel=1e-5)
    z = score_texts(rm, tok, prompts, texts)
    assert abs(z.mean().item()) < 1e-4 and z.std().item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(z, (raw - raw.mean()) / raw.std(), atol=1e-4, rtol=1e-4)
    assert torch.equal(z.argsort(), raw.argsort())  # the ranking is unchanged
    rc, rr = score_pairs(rm, tok, pairs)
    assert torch.equal(rc > rr, raw[:40] > raw[40:])
    # normalising again on the same samples changes nothing
    rm.normalize_(z)
    torch.testing.assert_close(score_texts(rm, tok, prompts, texts), z, atol=1e-4, rtol=1e-4)
    # the scale is in the state_dict: a saved and reloaded model scores alike
    assert {"score_gain", "score_bias"} <= set(rm.state_dict())
    torch.save(rm.state_dict(), tmp_path / "rm.pt")
    back = RewardModel(rm.config, pad_id=PAD)
    back.load_state_dict(torch.load(tmp_path / "rm.pt"))
    torch.testing.assert_close(score_texts(back, tok, prompts, texts), z, atol=1e-5, rtol=1e-5)


def test_a_new_reward_model_has_the_raw_scale_and_normalize_rejects_bad_scores():
    rm = small_rm()
    assert rm.score_gain.item() == 1.0 and rm.score_bias.item() == 0.0
    with pytest.raises(ValueError, match="at least two finite scores"):
        rm.normalize_(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="at least two finite scores"):
        rm.normalize_(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="all the scores are equal"):
        rm.normalize_(torch.tensor([2.0, 2.0, 2.0]))
    assert rm.score_gain.item() == 1.0 and rm.score_bias.item() == 0.0  # a refused call changes nothing
