"Tests of tinyllama.sft: the chat template, the masked loss, the Q/A data and its metric, bad input."
import random
import re

import pytest
import torch

from tinyllama.data import default_world, train_heldout
from tinyllama.model import LLM, LLMConfig
from tinyllama.tokenizer import train_tokenizer
from tinyllama.train import NextTokenPredictionDataset, TrainingConfig, tokenize_stories
from tinyllama.sft import (IGNORE_INDEX, QUESTION_KINDS, QAItem, SFTDataset, StoryRequest, answer_from_fields,
                           chat_replies, chat_reply, exact_match, follows_request, format_chat, masked_labels,
                           normalize_answer, qa_items, render_chat, score_answers, score_stories, sft_conversations,
                           sft_loss, sft_split, sft_train, story_questions, story_request)


@pytest.fixture(scope="module")
def tok():
    stories, _ = train_heldout(300, 0, seed=0)
    return train_tokenizer([s.text for s in stories], vocab_size=400)


@pytest.fixture(scope="module")
def stories():
    return default_world().sample(200, seed="test-sft")


def tiny_model(tok, context_size=320):
    torch.manual_seed(0)
    return LLM(LLMConfig(vocab_size=tok.vocab_size, context_size=context_size, dim_emb=32, num_layers=2,
                         num_heads=4, num_kv_heads=2, ffd_hidden_dim=64))


CHAT = [{"role": "system", "content": "You answer questions about stories."},
        {"role": "user", "content": "Tom had a red ball.\nWhat colour was the ball?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Who is the hero of the story?"},
        {"role": "assistant", "content": "Tom"}]


# ---- the template
def test_template_layout(tok):
    ids, mask = format_chat(CHAT, tok)
    assert len(ids) == len(mask)
    assert ids[0] == tok.bos_id and mask[0] == 0
    pos, roles = 1, {"system": tok.system_id, "user": tok.user_id, "assistant": tok.assistant_id}
    for m in CHAT:  # walk the layout: <|role|> text <|end|>, message after message
        text = tok.encode(m["content"])
        assert ids[pos] == roles[m["role"]] and mask[pos] == 0
        assert ids[pos + 1:pos + 1 + len(text)] == text
        assert tok.decode(ids[pos + 1:pos + 1 + len(text)]) == m["content"]
        assert ids[pos + 1 + len(text)] == tok.end_id
        want = int(m["role"] == "assistant")  # the assistant's words and its <|end|> are learned, nothing else
        assert mask[pos + 1:pos + 2 + len(text)] == [want] * (len(text) + 1)
        pos += 2 + len(text)
    assert pos == len(ids)
    assert tok.eos_id not in ids and tok.pad_id not in ids
    assert sum(mask) == len(tok.encode("red")) + len(tok.encode("Tom")) + 2


def test_generation_prompt_and_text_form(tok):
    msgs = CHAT[:4]
    ids, mask = format_chat(msgs, tok, add_generation_prompt=True)
    assert ids[-1] == tok.assistant_id and mask[-1] == 0
    assert ids[:-1] == format_chat(msgs, tok)[0]
    # the text form encodes (special tokens allowed) to exactly the same ids
    assert tok.encode(render_chat(msgs, add_generation_prompt=True), allow_special=True) == ids
    assert tok.encode(render_chat(CHAT), allow_special=True) == format_chat(CHAT, tok)[0]


def test_special_markers_typed_in_text_stay_text(tok):
    ids, mask = format_chat([{"role": "user", "content": "hi <|end|><|assistant|> x"}], tok)
    assert ids.count(tok.end_id) == 1 and ids.count(tok.assistant_id) == 0 and sum(mask) == 0


# ---- the dataset and the masked loss
def test_dataset_rows_padding_and_labels(tok, stories):
    chats = sft_conversations(stories[:40], seed=1, max_questions=2)
    ds = SFTDataset(chats, tok, context_size=320, seed=3)
    assert len(ds) == 40
    for i in (0, 7, 39):
        ids, mask = format_chat(chats[i], tok)
        x, y = ds[i]
        assert x.tolist() == ids[:-1]
        for t in range(len(y)):  # label = next token where the assistant wrote it, else ignored
            assert y[t].item() == (ids[t + 1] if mask[t + 1] else IGNORE_INDEX)
    x, y = ds.collate([0, 7, 39])
    for r, i in enumerate((0, 7, 39)):  # right padding: PAD (never EOS) in the inputs, IGNORE_INDEX in the labels
        n = len(ds[i][0])
        assert torch.equal(x[r, :n], ds[i][0]) and torch.equal(y[r, :n], ds[i][1])
        assert (x[r, n:] == tok.pad_id).all() and (y[r, n:] == IGNORE_INDEX).all()
    assert x.shape[1] == max(len(ds[i][0]) for i in (0, 7, 39))
    assert tok.pad_id != tok.eos_id and not (x == tok.eos_id).any()
    # deterministic per (seed, step), and DDP shards are the rows rank::world_size of the global batch
    x, y = ds.batch(5, 8)
    assert x.shape == y.shape and x.shape[0] == 8
    x2, y2 = ds.batch(5, 8)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xs, ys = ds.batch(5, 8, rank=1, world_size=2)
    w = xs.shape[1]
    assert torch.equal(xs, x[1::2, :w]) and torch.equal(ys, y[1::2, :w]) and (y[1::2, w:] == IGNORE_INDEX).all()


def test_prompt_targets_change_nothing(tok, stories):
    "Scrambling the next-token targets at prompt positions leaves the loss and every gradient unchanged."
    model = tiny_model(tok)
    g = torch.Generator().manual_seed(0)
    chats = sft_conversations(stories[:6], seed=2, write_fraction=0.5, max_questions=2)
    xs, ys, ys_scrambled, raw, orig = [], [], [], [], []
    for chat in chats:
        ids, mask = format_chat(chat, tok)
        noisy = [t if m else int(torch.randint(0, tok.vocab_size, (1,), generator=g)) for t, m in zip(ids, mask)]
        x, y = masked_labels(ids, mask)
        _, y2 = masked_labels(noisy, mask)  # same inputs, other targets wherever the prompt is
        xs.append(torch.tensor(x)); ys.append(torch.tensor(y)); ys_scrambled.append(torch.tensor(y2))
        raw.append(torch.tensor(noisy[1:])); orig.append(torch.tensor(ids[1:]))
    pad = lambda rows, v: torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=v)
    x, y, y2 = pad(xs, tok.pad_id), pad(ys, IGNORE_INDEX), pad(ys_scrambled, IGNORE_INDEX)
    raw, orig = pad(raw, IGNORE_INDEX), pad(orig, IGNORE_INDEX)  # every real position a target (padding ignored)
    assert not torch.equal(raw, orig)

    def grads(labels):
        model.zero_grad()
        loss = sft_loss(model(x), labels)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    l1, g1 = grads(y)
    l2, g2 = grads(y2)
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(g1, g2))
    # the scrambled targets do differ, and an unmasked loss would see them: the mask is what removes them
    unmasked = lambda t: torch.nn.functional.cross_entropy(model(x).flatten(0, 1), t.flatten()).item()
    assert abs(unmasked(raw) - unmasked(orig)) > 1e-3


def test_gradient_is_zero_at_prompt_positions(tok, stories):
    model = tiny_model(tok)
    ds = SFTDataset(sft_conversations(stories[:8], seed=4, max_questions=2), tok)
    x, y = ds.collate(list(range(8)))
    logits = model(x).detach().requires_grad_(True)
    sft_loss(logits, y).backward()
    per_pos = logits.grad.abs().sum(-1)  # (B, T)
    assert (per_pos[y == IGNORE_INDEX] == 0).all()
    assert (per_pos[y != IGNORE_INDEX] > 0).all()
    # the loss is the mean over the assistant's positions, computed independently
    lp = torch.log_softmax(logits.detach().float(), -1)
    keep = y != IGNORE_INDEX
    manual = -lp[keep].gather(-1, y[keep][:, None]).mean()
    assert torch.allclose(sft_loss(logits.detach(), y), manual, atol=1e-6)


def test_train_loss_is_the_masked_loss(tok, stories):
    "Chapter 07's train, given an SFTDataset, optimises exactly the assistant-token loss."
    model = tiny_model(tok)
    ds = SFTDataset(sft_conversations(stories[:32], seed=5, max_questions=2), tok, seed=9)
    x, y = ds.batch(0, 8)
    with torch.no_grad():
        want = sft_loss(model(x), y).item()
    cfg = TrainingConfig(steps=1, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=0, eval_every=0, log_every=1,
                         precision="fp32", device="cpu")
    res = sft_train(model, ds, cfg, progress=False)
    assert res.history[0]["loss"] == pytest.approx(want, rel=1e-5)


def _first_step_grads(model, data, config):
    "The gradient the optimizer receives at the first step of sft_train."
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    grads = []
    def grab(opt, args, kwargs):
        grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]])
    handle = register_optimizer_step_pre_hook(grab)
    try:
        sft_train(model, data, config, progress=False)
    finally:
        handle.remove()
    return grads[0]


@pytest.mark.parametrize("k", [2, 8])
def test_accumulated_chats_weigh_every_reply_token_the_same(tok, stories, k):
    "Replies of very different lengths: k micro-batches give the gradient of the one big batch."
    chats = sft_conversations(stories[:40], seed=6, write_fraction=0.5, max_questions=1)
    ds = SFTDataset(chats, tok, seed=3)
    x, y = ds.batch(0, 8)
    per_row = (y != IGNORE_INDEX).sum(1)
    assert per_row.max() >= 5 * per_row.min()  # story replies (~80 tokens) and one-word answers
    cfg = lambda **kw: TrainingConfig(steps=1, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=0, log_every=1,
                                      eval_every=0, grad_clip=0.0, precision="fp32", device="cpu", **kw)
    big = _first_step_grads(tiny_model(tok), ds, cfg())
    acc = _first_step_grads(tiny_model(tok), ds, cfg(grad_accum_steps=k))
    for a, b in zip(big, acc):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-4)
    with torch.no_grad():
        want = sft_loss(tiny_model(tok)(x), y).item()
    assert sft_train(tiny_model(tok), ds, cfg(grad_accum_steps=k), progress=False).losses()[0] == \
        pytest.approx(want, rel=1e-5)


def test_sft_dataset_is_a_batch_source_without_inheritance(tok, stories):
    from tinyllama.train import BatchSource
    ds = SFTDataset(sft_conversations(stories[:4], seed=1), tok)
    assert isinstance(ds, BatchSource) and not isinstance(ds, NextTokenPredictionDataset)
    assert ds.context_size == max(len(x) for x in ds.inputs)
    with pytest.raises(ValueError, match="rank"):
        ds.batch(0, 4, rank=2, world_size=2)


def test_masked_labels():
    x, y = masked_labels([1, 5, 6, 7, 8], [0, 0, 1, 1, 0])
    assert x == [1, 5, 6, 7] and y == [IGNORE_INDEX, 6, 7, IGNORE_INDEX]


# ---- the data: one checkable answer per question
def test_each_question_has_exactly_one_answer_derivable_from_the_story(stories):
    world = default_world()
    items = qa_items(stories)
    assert {q.kind for q in items} == set(QUESTION_KINDS)
    by_story = {}
    for q in items: by_story.setdefault(q.story, []).append(q)
    for text, qs in by_story.items():
        found = world.derivations(text)
        assert len(found) == 1  # one parse, so one value per field: the answer is determined by the text
        fields = found[0].fields
        for q in qs:
            assert answer_from_fields(q.kind, fields) == q.answer
            words = re.findall(r"[A-Za-z]+", q.story)
            if q.kind == "ending":
                assert q.answer in ("happy", "sad") and q.answer == fields["ending"]
            else:
                assert q.answer in words  # the answer is a word of the story...
                assert q.answer not in re.findall(r"[A-Za-z]+", q.question)  # ...that the question does not give away
        assert len({q.kind for q in qs}) == len(qs)  # each kind asked once per story
        assert ("friend" in {q.kind for q in qs}) == (fields["event"] == "friend")


def test_story_requests_are_checkable(stories):
    rng = random.Random(0)
    for s in stories[:60]:
        req = story_request(s, rng)
        assert follows_request(s.text, req)  # the story that made the request honours it
        assert req.instruction.startswith("Write a")
        for k, v in req.constraints:
            assert s.fields[k] == v
            if k not in ("ending",): assert v in req.instruction
    req = StoryRequest("Write a story about Mia.", (("hero", "Mia"),))
    mia = default_world().sample(1, seed=1, hero="Mia")[0]
    tom = default_world().sample(1, seed=1, hero="Tom")[0]
    assert follows_request(mia.text, req) and not follows_request(tom.text, req)
    assert not follows_request("Mia had a kite. The end.", req)  # not a story of the world


def test_heldout_stories_are_new():
    train, held = sft_split(300, 60, seed=0, exclude=["not a story"])
    assert len(train) == 300 and len(held) == 60
    assert not {s.text for s in train} & {s.text for s in held}
    # exclude works: a held-out text that we exclude is replaced
    _, held2 = sft_split(300, 60, seed=0, exclude=[held[0].text])
    assert held[0].text not in {s.text for s in held2}


def test_conversations(stories):
    chats = sft_conversations(stories[:100], seed=0, write_fraction=0.3, max_questions=3)
    assert len(chats) == 100
    writes = [c for c in chats if c[0]["content"].startswith("Write a")]
    assert 10 <= len(writes) <= 50
    for c in chats:
        assert [m["role"] for m in c][::2] == ["user"] * (len(c) // 2)
        assert [m["role"] for m in c][1::2] == ["assistant"] * (len(c) // 2)
        assert len(c) // 2 <= 3


def test_conversations_with_every_question(stories):
    "max_questions=None asks every question the story answers, each once, with its own answer, in a shuffled order."
    chats = sft_conversations(stories[:60], seed=1, write_fraction=0.0, max_questions=None)
    orders = set()
    for s, c in zip(stories[:60], chats):
        qs = story_questions(s)
        want, kind = {(q.question, q.answer) for q in qs}, {q.question: q.kind for q in qs}
        asked = [(m["content"].split("\n")[-1], a["content"]) for m, a in zip(c[::2], c[1::2])]
        assert len(asked) == len(want) and set(asked) == want
        assert c[0]["content"] == f"{s.text}\n{asked[0][0]}"  # the story is in the first turn only
        assert all("\n" not in m["content"] for m in c[2::2])
        orders.add(tuple(kind[q] for q, _ in asked))
    assert len(orders) > 10  # the kinds come in many orders, not one fixed order
    assert sft_conversations(stories[:60], seed=1, write_fraction=0.0, max_questions=None) == chats
    for bad in (0, -1, 2.5, True, "all"):
        with pytest.raises(ValueError, match="max_questions"):
            sft_conversations(stories[:2], max_questions=bad)


# ---- the metric, on hand-made cases
def test_exact_match_by_hand():
    assert exact_match("red", "red") and exact_match(" Red. ", "red") and exact_match("the park", "park")
    assert exact_match("a ball", "ball") and exact_match("Sad!", "sad")
    assert not exact_match("red kite", "red") and not exact_match("", "red") and not exact_match("re", "red")
    assert not exact_match("blue", "red") and not exact_match("Tom Mia", "Tom")
    assert normalize_answer("An Owl.") == "owl"


def test_score_answers_by_hand():
    items = [QAItem("s1", "Who is the hero of the story?", "Mia", "hero"),
             QAItem("s1", "What colour was the kite?", "red", "colour"),
             QAItem("s2", "Who is the hero of the story?", "Tom", "hero"),
             QAItem("s2", "Was the ending happy or sad?", "sad", "ending")]
    r = score_answers(items, ["Mia", "blue", "tom.", "happy"])
    assert r.accuracy == 0.5 and r.n == 4
    assert r.by_kind == {"hero": 1.0, "colour": 0.0, "ending": 0.0}
    assert r.count_by_kind == {"hero": 2, "colour": 1, "ending": 1}
    assert [ok for *_, ok in r.rows] == [True, False, True, False]
    with pytest.raises(ValueError, match="predictions"):
        score_answers(items, ["Mia"])


def test_qa_result_counts_and_intervals_per_kind():
    from tinyllama.sft import wilson_interval
    items = [QAItem(f"s{i}", "Who is the hero of the story?", "Mia", "hero") for i in range(4)]
    items += [QAItem("s9", "Was the ending happy or sad?", "sad", "ending")]
    r = score_answers(items, ["Mia", "Mia", "Tom", "Mia", "sad"])
    assert r.hits("hero") == (3, 4) and r.hits("ending") == (1, 1) and r.hits() == (4, 5)
    lo, hi = wilson_interval(3, 4)
    assert r.half_width("hero") == pytest.approx((hi - lo) / 2)
    assert r.interval == wilson_interval(4, 5)
    lines = r.table().splitlines()
    assert len(lines) == 2 and "75.0% of 4" in lines[0] and lines[0].split()[0] == "hero"
    assert "hero 3/4" in str(r) and "ending 1/1" in str(r)  # each kind with its count


def test_questions_per_kind_keeps_the_first_of_each_kind():
    from tinyllama.sft import questions_per_kind
    kinds = ["hero", "colour", "hero", "hero", "colour", "ending"]
    qs = [QAItem(f"s{i}", "q", "a", k) for i, k in enumerate(kinds)]
    assert [q.story for q in questions_per_kind(qs, 2)] == ["s0", "s1", "s2", "s4", "s5"]
    assert questions_per_kind(qs, None) == qs


def test_cpu_heldout_set_gives_every_kind_a_five_point_interval():
    "Issue 11: each kind's 95% Wilson interval is at most ±5 points, whatever the rate."
    from tinyllama.sft import sft_preset, wilson_interval
    for profile in ("cpu", "gpu"):
        _, held = sft_split(0, sft_preset(profile).n_heldout_stories)
        items = qa_items(held)
        for kind in QUESTION_KINDS:  # the widest interval is at a rate of 50%
            n = sum(q.kind == kind for q in items)
            lo, hi = wilson_interval(n // 2, n)
            assert (hi - lo) / 2 <= 0.05, (profile, kind, n)


def test_score_stories_by_hand():
    s = default_world().sample(1, seed=3, hero="Mia", colour="red", object="kite", event="rain")[0]
    req = StoryRequest("Write a story about Mia and a red kite.", (("hero", "Mia"), ("colour", "red"), ("object", "kite")))
    r = score_stories([req, req, req], [s.text, s.text.replace("Mia", "Lily"), "Once upon a kite."])
    assert [row[3] for row in r.rows] == [True, False, False]
    assert r.rate == pytest.approx(1 / 3) and r.parse_rate == pytest.approx(2 / 3)


# ---- generation through the template
def test_chat_replies_run_and_stop(tok):
    model = tiny_model(tok, context_size=128)
    chats = [[{"role": "user", "content": "Who is the hero?"}], [{"role": "user", "content": "Hi"}]]
    out = chat_replies(model, tok, chats, max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert out[1] == chat_reply(model, tok, chats[1], max_new_tokens=5)  # a padded batch row = the row alone


# ---- bad input
@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ("hello", "list"),
    ({"role": "user", "content": "hi"}, "list"),
    ([{"role": "user", "content": ""}], "empty"),
    ([{"role": "user", "content": "   \n"}], "empty"),
    ([{"role": "robot", "content": "hi"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": 3}], "text"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system"),
])
def test_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        format_chat(messages, tok)


def test_bad_input_elsewhere(tok, stories):
    with pytest.raises(ValueError, match="already ends with the assistant"):
        format_chat(CHAT, tok, add_generation_prompt=True)
    with pytest.raises(ValueError, match="at most 5"):
        format_chat(CHAT, tok, max_tokens=5)
    model = tiny_model(tok, context_size=64)
    long_chat = [{"role": "user", "content": stories[0].text + "\nWho is the hero of the story?"}]
    with pytest.raises(ValueError, match="context_size is 64"):
        chat_reply(model, tok, long_chat)
    with pytest.raises(ValueError, match="empty"):
        chat_reply(model, tok, [{"role": "user", "content": ""}])
    with pytest.raises(ValueError, match="wrap it in a list"):
        chat_replies(model, tok, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no assistant message"):
        SFTDataset([[{"role": "user", "content": "hi"}]], tok)
    with pytest.raises(ValueError, match="context_size"):
        SFTDataset(sft_conversations(stories[:5], write_fraction=1.0), tok, context_size=32)
    with pytest.raises(ValueError, match="non-empty"):
        SFTDataset([], tok)
    with pytest.raises(ValueError, match="nothing to learn"):
        sft_loss(torch.zeros(1, 3, 5), torch.full((1, 3), IGNORE_INDEX))
    plain = NextTokenPredictionDataset(tokenize_stories(stories[:5], tok), 32)
    with pytest.raises(ValueError, match="SFTDataset"):
        sft_train(model, plain, TrainingConfig(steps=1, batch_size=2, warmup_steps=0))
    with pytest.raises(ValueError, match="unknown question kind"):
        answer_from_fields("weather", stories[0].fields)


def test_wilson_interval_matches_known_values_and_rejects_bad_counts():
    from tinyllama.sft import format_rate, wilson_interval

    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and abs(hi - 0.27754) < 1e-4
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and abs(lo - 0.72246) < 1e-4  # symmetric to the case above
    lo, hi = wilson_interval(50, 100)  # about ±9.6 points at 50% of 100
    assert abs((hi - lo) / 2 - 0.0962) < 1e-3 and abs((lo + hi) / 2 - 0.5) < 1e-12
    assert format_rate(32, 50) == "64.0% of 50 (50.1%–75.9%)"
    for k, n in [(3, 2), (-1, 5), (1, 0), (1.5, 4)]:
        with pytest.raises(ValueError, match="0 <= k <= n"):
            wilson_interval(k, n)
