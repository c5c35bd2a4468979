"""Tests of tinyllama.feedback: the label file, the widget, the terminal labeler, the scripted labeler."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest

from tinyllama.feedback import (CHOICES, Comparison, LabelStore, LabelingSession, PreferenceCollector, Problem,
                                ScriptedLabeler, FEELING_SCALE, add_label_subcommand, label_main, pair_key,
                                read_labels, read_pairs, run_terminal_labeler, story_comparisons, story_prompt,
                                write_pairs)

PAIRS = [Comparison(f"prompt {i}", f"left {i}", f"right {i}", "m0") for i in range(5)]


def lines(path): return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


# ---- the store ---------------------------------------------------------------------------------------------

def test_record_writes_every_field_and_reloads(tmp_path):
    s = LabelStore(tmp_path / "sub" / "labels.jsonl")  # the folder is created on the first label
    rec = s.record(PAIRS[0], "a", labeler="ada")
    (row,) = lines(s.path)
    assert row == rec
    assert set(row) >= {"id", "prompt", "a", "b", "choice", "model_id", "time", "labeler"}
    assert (row["prompt"], row["a"], row["b"], row["choice"], row["model_id"], row["labeler"]) == \
        ("prompt 0", "left 0", "right 0", "a", "m0", "ada")
    assert row["time"].endswith("+00:00")  # ISO 8601 in UTC
    again = LabelStore(s.path)
    assert again.decisions == [rec] and again.problems == []


def test_counts_and_preference_pairs_leave_out_ties_and_skips(tmp_path):
    s = LabelStore(tmp_path / "l.jsonl")
    for p, c in zip(PAIRS, ["a", "b", "tie", "skip", "b"]): s.record(p, c)
    assert s.counts() == {"a": 1, "b": 2, "tie": 1, "skip": 1, "total": 5}
    pp = LabelStore(s.path).preference_pairs()
    assert [(p.prompt, p.chosen, p.rejected) for p in pp] == [
        ("prompt 0", "left 0", "right 0"), ("prompt 1", "right 1", "left 1"), ("prompt 4", "right 4", "left 4")]
    from tinyllama.reward import PreferencePair
    assert all(isinstance(p, PreferencePair) for p in pp)


def test_bad_choice_and_labeler_raise(tmp_path):
    s = LabelStore(tmp_path / "l.jsonl")
    with pytest.raises(ValueError, match="choice must be one of"): s.record(PAIRS[0], "A")
    with pytest.raises(ValueError, match="labeler"): s.record(PAIRS[0], "a", labeler="")
    with pytest.raises(ValueError, match="prompt, a and b"): s.record({"prompt": "p", "a": "x"}, "a")
    with pytest.raises(ValueError, match="folder"): LabelStore(tmp_path)
    assert not s.path.exists()  # nothing was written by the refused calls


def test_malformed_lines_are_reported_and_skipped(tmp_path):
    path = tmp_path / "l.jsonl"
    s = LabelStore(path)
    good = [s.record(p, c) for p, c in zip(PAIRS[:3], "ab") ]
    ok = dict(good[0], id="zzz")
    bad = [
        "this is not json",  # line 3
        json.dumps([1, 2, 3]),  # 4: not an object
        json.dumps({k: v for k, v in ok.items() if k != "choice"}),  # 5: missing field
        json.dumps(dict(ok, id="u1", choice="maybe")),  # 6: unknown choice
        json.dumps(dict(ok, id="u2", prompt=7)),  # 7: wrong type
        json.dumps(dict(ok, id="u3", time="yesterday")),  # 8: not a date
        json.dumps(dict(ok, id=good[0]["id"])),  # 9: duplicate id
        json.dumps({"id": "x", "undo": "no-such-id"}),  # 10: undo of nothing
        "",  # 11: blank, harmless
    ]
    with open(path, "a") as f: f.write("\n".join(bad) + "\n")
    with open(path, "ab") as f: f.write(b"\xff\xfe\n")  # 12: not UTF-8
    s.record(PAIRS[3], "tie")  # 13: still appended and read after the junk
    labels = read_labels(path)
    assert [d["id"] for d in labels.decisions] == [g["id"] for g in good] + [labels.decisions[-1]["id"]]
    assert [p.line for p in labels.problems] == [3, 4, 5, 6, 7, 8, 9, 10, 12]
    reasons = " | ".join(p.reason for p in labels.problems)
    for words in ("not valid JSON", "not a JSON object", "missing field(s) choice", "unknown choice 'maybe'",
                  "'prompt' should be a string", "not an ISO 8601 date", "used before", "no earlier line", "UTF-8"):
        assert words in reasons, words
    assert all(isinstance(p, Problem) and str(p).startswith(f"line {p.line}:") for p in labels.problems)


def test_a_cut_off_last_line_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / "l.jsonl"
    s = LabelStore(path)
    first = s.record(PAIRS[0], "a")
    with open(path, "ab") as f: f.write(b'{"id": "half", "prompt": "p')  # a crash in the middle of a write
    labels = read_labels(path)
    assert [d["id"] for d in labels.decisions] == [first["id"]]
    assert len(labels.problems) == 1 and "cut off" in labels.problems[0].reason
    s2 = LabelStore(path)
    second = s2.record(PAIRS[1], "b")
    labels = read_labels(path)
    assert [d["id"] for d in labels.decisions] == [first["id"], second["id"]]
    assert [p.line for p in labels.problems] == [2]


def test_missing_file_is_empty(tmp_path):
    s = LabelStore(tmp_path / "none.jsonl")
    assert len(s) == 0 and s.problems == [] and s.counts()["total"] == 0 and s.preference_pairs() == []
    assert s.undo() is None and not s.path.exists()


# ---- undo ----------------------------------------------------------------------------------------------------

def test_undo_appends_a_record_and_never_rewrites(tmp_path):
    s = LabelStore(tmp_path / "l.jsonl")
    r1, r2 = s.record(PAIRS[0], "a"), s.record(PAIRS[1], "b")
    before = s.path.read_bytes()
    undone = s.undo()
    assert undone == r2
    after = s.path.read_bytes()
    assert after.startswith(before)  # append-only: the old bytes are untouched
    assert lines(s.path)[-1]["undo"] == r2["id"]
    assert [d["id"] for d in LabelStore(s.path).decisions] == [r1["id"]]
    # undo a named decision, then undoing it again is refused
    assert s.undo(r1["id"]) == r1 and LabelStore(s.path).decisions == []
    with pytest.raises(ValueError, match="no decision in force"): s.undo(r1["id"])
    # an undo record repeated by hand is reported, not fatal
    with open(s.path, "a") as f: f.write(json.dumps({"id": "again", "undo": r1["id"]}) + "\n")
    labels = read_labels(s.path)
    assert labels.decisions == [] and "already undone" in labels.problems[0].reason


# ---- the session and the widget ---------------------------------------------------------------------------

def test_widget_buttons_record_and_advance(tmp_path):
    c = PreferenceCollector(PAIRS, tmp_path / "l.jsonl", labeler="ada")
    assert set(c.buttons) == {"a", "b", "tie", "skip", "undo"}
    assert [c.buttons[k].description for k in ("a", "b", "tie", "skip", "undo")] == \
        ["A is better", "B is better", "tie", "skip", "undo"]
    assert "prompt 0" in c.prompt_html.value and "left 0" in c.a_html.value and "right 0" in c.b_html.value
    for k in ("a", "b", "tie", "skip"): c.buttons[k].click()
    assert [r["choice"] for r in lines(c.store.path)] == ["a", "b", "tie", "skip"]
    assert [r["prompt"] for r in lines(c.store.path)] == [f"prompt {i}" for i in range(4)]
    assert c.current == PAIRS[4] and c.remaining == 1
    assert "<b>4</b> labels" in c.count_html.value and "<b>1</b> to go" in c.count_html.value


def test_each_click_is_on_disk_before_the_next_pair_shows(tmp_path):
    path = tmp_path / "l.jsonl"
    c = PreferenceCollector(PAIRS, path)
    seen = []
    original = c._render
    def render():  # at every redraw, the file already holds every click so far
        seen.append((len(lines(path)) if path.exists() else 0, c.remaining))
        original()
    c._render = render
    for _ in range(3): c.buttons["b"].click()
    assert seen == [(1, 4), (2, 3), (3, 2)]


def test_undo_button_brings_the_pair_back(tmp_path):
    c = PreferenceCollector(PAIRS, tmp_path / "l.jsonl")
    c.buttons["a"].click(); c.buttons["b"].click()
    assert c.current == PAIRS[2]
    c.buttons["undo"].click()
    assert c.current == PAIRS[1] and c.counts()["total"] == 1 and "Undone" in c.status_html.value
    c.buttons["tie"].click()
    assert [(d["prompt"], d["choice"]) for d in LabelStore(c.store.path).decisions] == \
        [("prompt 0", "a"), ("prompt 1", "tie")]
    c.buttons["undo"].click(); c.buttons["undo"].click(); c.buttons["undo"].click()  # the third has nothing left
    assert c.counts()["total"] == 0 and c.current == PAIRS[0] and "Nothing to undo" in c.status_html.value


def test_clicking_with_no_pairs_left_shows_a_message(tmp_path):
    c = PreferenceCollector(PAIRS[:1], tmp_path / "l.jsonl")
    c.buttons["a"].click()
    assert c.current is None and "All done" in c.prompt_html.value
    for k in ("a", "b", "tie", "skip"): c.buttons[k].click()  # no exception
    assert "No pairs left" in c.status_html.value
    assert len(lines(c.store.path)) == 1
    empty = PreferenceCollector([], tmp_path / "e.jsonl")
    empty.buttons["a"].click()
    assert "No pairs left" in empty.status_html.value and not (tmp_path / "e.jsonl").exists()


def test_reopening_resumes(tmp_path):
    path = tmp_path / "l.jsonl"
    c = PreferenceCollector(PAIRS, path)
    c.buttons["a"].click(); c.buttons["skip"].click()
    c2 = PreferenceCollector(PAIRS, path)  # a new session on the same file
    assert c2.current == PAIRS[2] and c2.remaining == 3  # the labelled (and the skipped) pairs are not shown again
    assert c2.counts() == {"a": 1, "b": 0, "tie": 0, "skip": 1, "total": 2}
    assert "<b>2</b> labels" in c2.count_html.value
    c2.buttons["undo"].click()  # undo reaches back into the earlier session
    assert c2.current == PAIRS[1]
    assert PreferenceCollector(PAIRS, path).remaining == 4


def test_widget_reports_problems_of_the_file(tmp_path):
    path = tmp_path / "l.jsonl"
    LabelStore(path).record(PAIRS[0], "a")
    with open(path, "a") as f: f.write("garbage\n")
    c = PreferenceCollector(PAIRS, path)
    assert "1 line(s)" in c.problems_html.value and "line 2" in c.problems_html.value
    assert c.remaining == 4


def test_duplicate_pairs_are_shown_once(tmp_path):
    s = LabelingSession([PAIRS[0], PAIRS[0], ("prompt 0", "left 0", "right 0"), PAIRS[1]], tmp_path / "l.jsonl")
    assert s.remaining == 2
    with pytest.raises(ValueError, match="labeler"): LabelingSession(PAIRS, tmp_path / "l.jsonl", labeler=" ")


# ---- a process killed between clicks ----------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    from tinyllama.feedback import Comparison, PreferenceCollector
    pairs = [Comparison(f"p{i}", f"a{i}", f"b{i}") for i in range(1000)]
    c = PreferenceCollector(pairs, sys.argv[1], labeler="child")
    for i in range(1000):
        c.buttons["ab"[i % 2]].click()
        print(c.store.decisions[-1]["id"], flush=True)  # reported only after the click returned
        time.sleep(0.01)
""")


def test_a_labeler_killed_between_clicks_loses_nothing(tmp_path):
    path = tmp_path / "l.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    clicked = []
    try:
        deadline = time.time() + 120
        while len(clicked) < 15 and time.time() < deadline:
            line = proc.stdout.readline()
            if not line: break
            clicked.append(line.strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(clicked) >= 15, "the child process did not click in time"
    labels = read_labels(path)
    ids = [d["id"] for d in labels.decisions]
    assert ids[:len(clicked)] == clicked  # every click it reported is in the file, in order
    assert all(p.line == len(ids) + 1 for p in labels.problems)  # at most the line being written when killed
    resumed = PreferenceCollector([Comparison(f"p{i}", f"a{i}", f"b{i}") for i in range(1000)], path)
    assert resumed.remaining == 1000 - len(ids) and resumed.current.prompt == f"p{len(ids)}"


# ---- the terminal labeler ---------------------------------------------------------------------------------

def feed(answers):
    it = iter(answers)
    def _input(prompt=""):
        try: return next(it)
        except StopIteration: raise EOFError
    return _input


def test_terminal_labeler_keys(tmp_path):
    out = []
    counts = run_terminal_labeler(PAIRS, tmp_path / "l.jsonl", labeler="tty",
                                  input=feed(["a", "x", "B", "u", "t", "s", "q", "a"]), output=out.append)
    assert counts == {"a": 1, "b": 0, "tie": 1, "skip": 1, "total": 3}
    rows = [r for r in lines(tmp_path / "l.jsonl")]
    assert [r.get("choice", "undo") for r in rows] == ["a", "b", "undo", "tie", "skip"]
    assert [r["prompt"] for r in LabelStore(tmp_path / "l.jsonl").decisions] == ["prompt 0", "prompt 1", "prompt 2"]
    assert all(r["labeler"] == "tty" for r in rows)
    text = "\n".join(out)
    assert "unknown answer 'x'" in text and "PROMPT: prompt 0" in text and "[A] left 0" in text


def test_terminal_labeler_resumes_and_stops_at_end_of_input(tmp_path):
    path = tmp_path / "l.jsonl"
    run_terminal_labeler(PAIRS, path, input=feed(["a", "a"]), output=lambda s: None)  # EOF ends it like q
    out = []
    counts = run_terminal_labeler(PAIRS, path, input=feed(["b", "b", "b", "b"]), output=out.append)
    assert counts["total"] == 5 and counts["a"] == 2 and counts["b"] == 3
    text = "\n".join(out)
    assert "2 labels already" in text and "3 pairs to label" in text and "No pairs left" in text
    assert "PROMPT: prompt 0" not in text


def test_label_main_with_a_pairs_file(tmp_path):
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", PAIRS[:3])
    assert read_pairs(pairs_file) == PAIRS[:3]
    out = []
    rc = label_main(["label", "--pairs", str(pairs_file), "--out", str(tmp_path / "l.jsonl"), "--labeler", "me"],
                    input=feed(["a", "b", "t"]), output=out.append)
    assert rc == 0
    assert [(d["choice"], d["labeler"]) for d in LabelStore(tmp_path / "l.jsonl").decisions] == \
        [("a", "me"), ("b", "me"), ("tie", "me")]


def test_label_main_reports_bad_input(tmp_path):
    out = []
    assert label_main(["--pairs", str(tmp_path / "missing.jsonl")], input=feed([]), output=out.append) == 2
    assert "no pairs file" in out[-1]
    bad = tmp_path / "bad.jsonl"; bad.write_text('{"prompt": "p", "a": "x"}\n')
    assert label_main(["--pairs", str(bad)], input=feed([]), output=out.append) == 2
    assert "line 1" in out[-1]
    with pytest.raises(SystemExit): label_main([], input=feed([]), output=out.append)  # --pairs or --demo needed


def test_add_label_subcommand_wires_into_a_parser(tmp_path):
    import argparse
    parser = argparse.ArgumentParser(prog="tinyllama")
    sub = parser.add_subparsers(dest="command")
    add_label_subcommand(sub)
    args = parser.parse_args(["label", "--demo", "2", "--out", str(tmp_path / "l.jsonl")])
    assert args.command == "label" and args.demo == 2 and callable(args.func)
    import builtins
    answers = feed(["a", "b"])
    old = builtins.input
    builtins.input = answers
    try: rc = args.func(args)
    finally: builtins.input = old
    assert rc == 0 and LabelStore(tmp_path / "l.jsonl").counts()["total"] == 2


def test_label_command_in_a_real_terminal_process(tmp_path):
    code = "import sys; from tinyllama.feedback import label_main; sys.exit(label_main())"
    r = subprocess.run([sys.executable, "-c", code, "label", "--demo", "3", "--out", str(tmp_path / "l.jsonl")],
                       input="a\nb\nq\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert LabelStore(tmp_path / "l.jsonl").counts() == {"a": 1, "b": 1, "tie": 0, "skip": 0, "total": 2}


# ---- story pairs and the scripted labeler -----------------------------------------------------------------

def test_story_comparisons_share_the_opening_and_differ():
    from tinyllama.data import default_world
    w = default_world()
    pairs = story_comparisons(12, seed=3)
    assert len(pairs) == 12 and pairs == story_comparisons(12, seed=3)
    for p in pairs:
        assert p.a != p.b
        sa, sb = w.parse(p.prompt + p.a), w.parse(p.prompt + p.b)  # both are whole stories of the world
        assert sa.event == sb.event and sa.hero == sb.hero
        assert story_prompt(sa) == p.prompt


def test_scripted_labeler_taste():
    from tinyllama.data import default_world
    lab = ScriptedLabeler()
    for s in default_world().sample(40, seed=9):  # a whole story: its feeling on the stated scale
        prompt = story_prompt(s)
        assert lab.score(prompt, s.text[len(prompt):]) == FEELING_SCALE[s.feeling]
        assert lab.score("", s.text) == FEELING_SCALE[s.feeling]  # a chat answer: the story alone
    assert lab.score("", "and then he felt sad. Later he was proud") == FEELING_SCALE["proud"] - 0.5  # last word
    assert lab.score("", "no feelings at all") == -5
    assert lab.score("", "he was unhappy") == -5  # whole words only
    happy = "Tom felt happy. The end."
    assert lab.prefer(("", happy, "Tom felt sad.")) == "a"
    assert lab.prefer(("", "Tom felt sad.", happy)) == "b"
    assert lab.prefer(("", happy, happy + " ")) == "tie"


def test_scripted_labeler_drives_the_widget_by_its_buttons(tmp_path):
    pairs = story_comparisons(20, seed=1)
    c = PreferenceCollector(pairs, tmp_path / "l.jsonl", labeler="bot")
    lab = ScriptedLabeler()
    clicks = []
    for k, b in c.buttons.items(): b.on_click(lambda _b, k=k: clicks.append(k))
    counts = lab.label(c)
    assert counts["total"] == 20 and len(clicks) == 20 and c.current is None
    for d in LabelStore(c.store.path).decisions:
        sa, sb = lab.score(d["prompt"], d["a"]), lab.score(d["prompt"], d["b"])
        assert d["choice"] == ("a" if sa > sb else "b" if sb > sa else "tie")
    assert [d["choice"] for d in LabelStore(c.store.path).decisions] == clicks
    pp = LabelStore(c.store.path).preference_pairs()
    assert all(lab.score(p.prompt, p.chosen) > lab.score(p.prompt, p.rejected) for p in pp)
    assert lab.label(c) == counts  # nothing left: no clicks, no error


def test_comparison_validation():
    with pytest.raises(ValueError, match="string"): Comparison("p", 1, "b")
    with pytest.raises(ValueError, match="cannot read a pair"): LabelingSession([42], "unused.jsonl")
    assert Comparison("p", "a", "b").key == pair_key("p", "a", "b") != pair_key("p", "b", "a")


# ---- the loop's pieces: prompts, samples, the judge, the reward function ----------------------------------

@pytest.fixture(scope="module")
def chat_model():
    import torch
    from tinyllama.data import default_world
    from tinyllama.model import LLMConfig
    from tinyllama.tokenizer import train_tokenizer
    from _models import randomized
    torch.set_num_threads(1)
    tok = train_tokenizer([s.text for s in default_world().sample(200, seed="feedback-tests")], vocab_size=400)
    cfg = LLMConfig(vocab_size=tok.vocab_size, context_size=64, dim_emb=32, num_layers=1, num_heads=4, num_kv_heads=2,
                    ffd_hidden_dim=64)
    return randomized(cfg, seed=3), tok


def test_story_requests_leave_the_ending_open_and_are_reproducible():
    from tinyllama.feedback import story_requests
    rs = story_requests(300, seed=5)
    assert len(rs) == 300 and rs == story_requests(300, seed=5) and rs != story_requests(300, seed=6)
    assert all(r.startswith("Write a") for r in rs)
    assert not any(" happy story" in r or " sad story" in r for r in rs)  # the one template that fixes the ending
    assert len({r.split(" about ")[0] for r in rs}) > 1  # more than one kind of request
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive integer"): story_requests(bad)


def test_chat_prompt_ids_ask_for_the_assistants_reply(chat_model):
    from tinyllama.feedback import chat_prompt_ids
    _, tok = chat_model
    (ids,) = chat_prompt_ids(tok, ["Write a story about Mia."])
    assert ids[0] == tok.bos_id and ids[1] == tok.user_id and ids[-2:] == [tok.end_id, tok.assistant_id]
    assert tok.decode(ids) == "Write a story about Mia."
    with pytest.raises(ValueError, match="list of strings"): chat_prompt_ids(tok, "Write a story.")


def test_sample_completions_in_chat_stop_at_end_and_follow_the_seed(chat_model):
    import torch
    from tinyllama.feedback import chat_prompt_ids, sample_completions
    from tinyllama.generate import generate
    model, tok = chat_model
    prompts = ["Write a story about Mia.", "Write a story about a red kite.", "Write a story about Tom."]
    a = sample_completions(model, tok, prompts, 20, seed=[1, 2, 3], chat=True)
    assert a == sample_completions(model, tok, prompts, 20, seed=[1, 2, 3], chat=True)
    assert a != sample_completions(model, tok, prompts, 20, seed=[4, 5, 6], chat=True)
    # the rows' tokens, decoded up to <|end|>: generation stops there, not at </s>
    raw = generate(model, chat_prompt_ids(tok, prompts), 20, 1.0, eos_id=tok.end_id, pad_id=tok.pad_id, seed=[1, 2, 3])
    for text, ids in zip(a, raw):
        assert tok.end_id not in ids[:-1] and (len(ids) == 20 or ids[-1] == tok.end_id)
        assert text == tok.decode(ids).strip() and "<|" not in text
    with pytest.raises(ValueError, match="max_new_tokens"):  # prompt + reply longer than the context
        sample_completions(model, tok, prompts, 64, chat=True)
    with pytest.raises(ValueError, match="non-empty list"): sample_completions(model, tok, [], chat=True)


def test_sample_comparisons_pair_two_different_samples(chat_model):
    from tinyllama.feedback import sample_comparisons
    model, tok = chat_model
    prompts = [f"Write a story about {n}." for n in ("Mia", "Tom", "Zoe", "Leo")]
    cs = sample_comparisons(model, tok, prompts, "m1", max_new_tokens=12, seed=2, chat=True)
    assert cs and all(c.a != c.b and c.model_id == "m1" and c.prompt in prompts for c in cs)
    assert cs == sample_comparisons(model, tok, prompts, "m1", max_new_tokens=12, seed=2, chat=True)


class _Judge:
    "Prefers the completion that contains 'good'; a tie when both or neither do."
    def prefer(self, pair):
        a, b = "good" in pair.a, "good" in pair.b
        return "tie" if a == b else "a" if a else "b"


def test_head_to_head_counts_wins_ties_and_losses_whatever_the_sides():
    from tinyllama.feedback import head_to_head
    xs = ["good"] * 5 + ["bad"] * 3 + ["good"] * 2
    ys = ["bad"] * 5 + ["good"] * 3 + ["good"] * 2
    for seed in range(5):  # the sides are shuffled differently; the verdict must not change
        r = head_to_head(_Judge(), ["p"] * 10, xs, ys, seed=seed)
        assert (r["wins"], r["ties"], r["losses"], r["n"]) == (5, 2, 3, 10) and r["win_rate"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="one x and one y"): head_to_head(_Judge(), ["p"], ["a", "b"], ["c"])


def test_text_reward_fn_scores_the_users_message_and_the_reply(chat_model, monkeypatch):
    import torch
    import tinyllama.reward
    from tinyllama.feedback import chat_prompt_ids, text_reward_fn
    from tinyllama.generate import left_pad
    _, tok = chat_model
    seen = {}
    def fake_score_texts(rm, tokenizer, prompts, completions):
        seen.update(prompts=prompts, completions=completions)
        return torch.arange(len(prompts), dtype=torch.float)
    monkeypatch.setattr(tinyllama.reward, "score_texts", fake_score_texts)
    prompts = ["Write a story about Mia.", "Write a story about a red kite in the park."]  # different lengths
    replies = ["Mia felt happy. The end.", "Tom was sad."]
    prompt_ids, _ = left_pad(chat_prompt_ids(tok, prompts), tok.pad_id, torch.device("cpu"))
    rows = [tok.encode(r) + [tok.end_id] for r in replies]
    width = max(map(len, rows)) + 2
    response_ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    scores = text_reward_fn(None, tok)(prompt_ids, response_ids)
    assert seen == {"prompts": prompts, "completions": replies}  # no <|end|>, PAD or role tokens in the text
    assert scores.tolist() == [0.0, 1.0]


# ---- the recipe: run_feedback_loop and its preset ---------------------------------------------------------

def test_feedback_preset_is_frozen_and_follows_the_profile():
    import dataclasses
    from tinyllama.feedback import FeedbackPreset, feedback_preset
    from tinyllama.profiles import Profile
    ci, cpu, gpu = feedback_preset("ci"), feedback_preset("cpu"), feedback_preset(Profile("gpu"))
    assert isinstance(ci, FeedbackPreset) and feedback_preset() == ci  # the tests run in the ci profile
    assert (cpu.n_label, cpu.n_heldout, cpu.rm_steps, cpu.ppo_steps, cpu.ppo_epochs) == (1300, 400, 150, 100, 4)
    # the missing-EOS penalty is on (one std of the normalised reward); half the labelled
    # pairs held out from the RM in cpu (about 330), for intervals within ±5 points
    assert ci.missing_eos_penalty == cpu.missing_eos_penalty == gpu.missing_eos_penalty == 1.0
    assert cpu.rm_val_fraction == 0.5 and ci.rm_val_fraction == 0.15
    assert ci.n_label < cpu.n_label < gpu.n_label and ci.ppo_steps < cpu.ppo_steps <= gpu.ppo_steps
    with pytest.raises(dataclasses.FrozenInstanceError): ci.ppo_steps = 5
    assert dataclasses.replace(ci, ppo_steps=5).ppo_steps == 5 and ci.ppo_steps == 2
    with pytest.raises(ValueError, match="profile"): feedback_preset("tpu")


@pytest.fixture(scope="module")
def loop_model(chat_model):
    "chat_model's tokenizer, and a random model whose context holds a whole story-world pair."
    import dataclasses
    from _models import randomized
    model, tok = chat_model
    return randomized(dataclasses.replace(model.config, context_size=256), seed=4), tok


def test_run_feedback_loop_in_the_ci_profile(loop_model, tmp_path):
    import torch
    from matplotlib.figure import Figure
    from tinyllama.feedback import FeedbackRun, feedback_preset, run_feedback_loop
    model, tok = loop_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = run_feedback_loop(model, tok, tmp_path, "ci", seed=1, progress=False)
    preset = feedback_preset("ci")
    assert isinstance(run, FeedbackRun) and run.preset == preset and run.labeler == "scripted:happy-ending"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # π_SFT is left as it was
    assert run.policy is not model and len(run.history) == preset.ppo_steps
    # the labels are on disk: samples of the SFT policy, plus story-world pairs for a policy that writes ties
    labels = LabelStore(tmp_path / "labels.jsonl")
    assert labels.counts() == run.counts and labels.problems == []
    assert all(d["model_id"] == "sft" and d["labeler"] == run.labeler for d in labels.decisions)
    assert run.padded == (tmp_path / "labels-story-world.jsonl").exists()
    assert run.n_train_pairs > 0 and run.n_val_pairs >= 1 and 0 <= run.rm_accuracy <= 1
    assert len(run.rm_history) == preset.rm_steps
    # the verdict: one reply of each policy per held-out request
    n = preset.n_heldout
    assert len(run.prompts) == len(run.before) == len(run.after) == len(run.kl) == n
    assert len(run.scores_before) == len(run.scores_after) == n and run.verdict["n"] == n
    assert not set(run.prompts) & {d["prompt"] for d in labels.decisions}  # held out from labelling
    assert run.verdict["wins"] + run.verdict["ties"] + run.verdict["losses"] == n
    assert run.kl_mean == pytest.approx(sum(run.kl) / n)
    assert set(run.seconds) == {"label", "reward_model", "ppo", "verdict"}
    assert isinstance(run.plot, Figure) and len(run.plot.axes) == 3
    text = "\n\n".join(run.summary())
    assert len(run.summary()) == 4 and f"{run.verdict['win_rate']:.1%}" in text and "labels.jsonl" in text


def test_run_feedback_loop_rejects_bad_arguments(chat_model, tmp_path):
    from tinyllama.feedback import run_feedback_loop
    model, tok = chat_model
    with pytest.raises(ValueError, match="must be an LLM"): run_feedback_loop(object(), tok, tmp_path, "ci")
    with pytest.raises(ValueError, match="profile"): run_feedback_loop(model, tok, tmp_path, "tpu")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="a folder"): run_feedback_loop(model, tok, tmp_path / "file", "ci")
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]  # nothing was written


def test_label_main_refuses_empty_input(tmp_path):
    out = []
    assert label_main(["--demo", "0"], input=feed([]), output=out.append) == 2
    assert "nothing to label" in out[-1]
    (tmp_path / "empty.jsonl").write_text("\n")
    assert label_main(["--pairs", str(tmp_path / "empty.jsonl")], input=feed([]), output=out.append) == 2
    assert "no pairs" in out[-1]
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\n")
    assert label_main(["--pairs", str(tmp_path / "bin.jsonl")], input=feed([]), output=out.append) == 2
    assert "UTF-8" in out[-1] and all(o.startswith("tinyllama label: error:") for o in out)
    assert not (tmp_path / "labels.jsonl").exists()


def test_feedback_reward_model_is_normalised_on_sft_samples_and_ppo_gets_the_eos_penalty(loop_model):
    "The loop's reward model scores π_SFT's samples at mean 0, std 1; PPO's config carries the preset's penalty."
    import dataclasses
    from tinyllama.feedback import _fit_reward_model, _train_policy, feedback_preset, sample_comparisons, story_requests
    from tinyllama.reward import score_texts, story_preference_pairs
    model, tok = loop_model
    preset = dataclasses.replace(feedback_preset("ci"), missing_eos_penalty=0.75)
    requests = story_requests(6, seed=2)
    samples = sample_comparisons(model, tok, requests, "sft", 16, seed=0, chat=True)
    pairs = story_preference_pairs(12, seed=3)  # labelled pairs (any will do here)
    rm, history, acc, n_val = _fit_reward_model(model, tok, pairs, samples, preset, 0, False)
    assert n_val == max(1, round(12 * preset.rm_val_fraction)) and 0 <= acc <= 1
    z = score_texts(rm, tok, [c.prompt for c in samples] * 2, [c.a for c in samples] + [c.b for c in samples])
    assert abs(z.mean().item()) < 1e-4 and z.std().item() == pytest.approx(1.0, abs=1e-4)
    assert rm.score_gain.item() != 1.0  # the Bradley–Terry fit alone does not give std 1
    trainer = _train_policy(model, tok, rm, requests, dataclasses.replace(preset, ppo_steps=1), 16, 0, False)
    assert trainer.config.missing_eos_penalty == 0.75 and trainer.config.init_kl_coef == preset.kl_coef
