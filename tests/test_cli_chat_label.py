"""`tinyllama chat` and `tinyllama label` (tinyllama.cli), driven through `main([...])` with scripted stdin.

The chat model is trained here, in a second or two, to answer two questions; the label tests use
chapter 12's demo pairs."""
import io
import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
from tinyllama.cli import main  # noqa: E402
from tinyllama.sft import ChatSession  # noqa: E402
from tinyllama.checkpoint import save_checkpoint  # noqa: E402
from tinyllama.data import StoryWorld  # noqa: E402
from tinyllama.feedback import read_labels, story_comparisons, write_pairs, pair_key  # noqa: E402
from tinyllama.model import LLM, LLMConfig  # noqa: E402
from tinyllama.sft import chat_reply, format_chat  # noqa: E402
from tinyllama.tokenizer import train_tokenizer  # noqa: E402

QA = [("Who is the hero?", "Tom"), ("What colour was the kite?", "red")]


def _run(argv, capsys, stdin=None, monkeypatch=None):
    "(exit code, stdout, stderr) of main(argv), with `stdin` as the standard input."
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def tokenizer():
    texts = [s.text for s in StoryWorld().sample(200, seed=0)]
    return train_tokenizer(texts, vocab_size=400)


def _train_chat_model(tok, context_size=64, steps=100):
    "A tiny LLM taught the QA turns (alone and as one two-turn chat), loss on the assistant's tokens only."
    torch.manual_seed(0)
    model = LLM(LLMConfig(vocab_size=tok.vocab_size, context_size=context_size, dim_emb=32, num_layers=2,
                          num_heads=4, num_kv_heads=2, ffd_hidden_dim=64))
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    chats.append(chats[0] + chats[1])
    rows = [format_chat(c, tok) for c in chats]
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), tok.pad_id)
    y = torch.full((len(rows), T), -100)
    for i, (ids, mask) in enumerate(rows):  # padding on the right: causal attention never sees it
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(); loss.backward(); opt.step()
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny matrices, one thread


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, tokenizer):
    "A checkpoint folder as the speedrun's SFT stage writes it: weights, config, tokenizer, extra={'stage': 'sft'}."
    folder = tmp_path_factory.mktemp("chat") / "sft"
    model = _train_chat_model(tokenizer)
    save_checkpoint(folder, model, step=1, extra={"stage": "sft"})
    tokenizer.save(folder / "tokenizer.model")
    return folder, model


def test_one_shot_message_prints_only_the_reply(chat_ckpt, tokenizer, capsys):
    folder, model = chat_ckpt
    for q, a in QA:
        code, out, err = _run(["chat", "--checkpoint", str(folder), "--message", q], capsys)
        assert code == 0 and out == a + "\n", (out, err)
        assert "note:" not in err  # a fine-tuned checkpoint gets no warning
    # the command's reply is chat_reply of the same one-message chat
    assert chat_reply(model, tokenizer, [{"role": "user", "content": QA[0][0]}], max_new_tokens=8) == QA[0][1]


def test_repl_keeps_history_and_ends_at_quit(chat_ckpt, tokenizer, capsys, monkeypatch):
    folder, model = chat_ckpt
    stdin = f"{QA[0][0]}\n\n{QA[1][0]}\n/quit\nnever read\n"
    code, out, err = _run(["chat", "--checkpoint", str(folder)], capsys, stdin, monkeypatch)
    assert code == 0
    replies = [line.split("> ", 1)[1] for line in out.splitlines() if line.startswith("assistant> ")]
    # the second reply is the answer to the two-turn chat, as chat_reply gives it
    two_turns = [{"role": "user", "content": QA[0][0]}, {"role": "assistant", "content": replies[0]},
                 {"role": "user", "content": QA[1][0]}]
    room = model.config.context_size - len(format_chat(two_turns, tokenizer, add_generation_prompt=True)[0])
    assert replies == [QA[0][1], chat_reply(model, tokenizer, two_turns, max_new_tokens=room)]
    assert "empty" in out  # the empty line got a message, not a reply
    assert "never read" not in out


def test_repl_ends_at_end_of_input_and_reset(chat_ckpt, capsys, monkeypatch):
    folder, _ = chat_ckpt
    code, out, _ = _run(["chat", "--checkpoint", str(folder)], capsys, f"{QA[0][0]}\n/reset\n/nonsense\n", monkeypatch)
    assert code == 0 and "a new conversation" in out and "unknown command" in out


def test_history_drops_oldest_turns_to_fit_the_context(tokenizer):
    q = "Who is the hero of this story?"
    n_one = len(format_chat([{"role": "user", "content": q}], tokenizer, add_generation_prompt=True)[0])
    ctx = n_one + ChatSession.MIN_REPLY + 4  # one question and its reply fit, two questions do not
    model = _train_chat_model(tokenizer, context_size=ctx, steps=1)  # replies do not matter here
    s = ChatSession(model, tokenizer)
    first = s.reply(q)
    assert s.notes == [] and len(s.messages) == 1 + bool(first.strip())
    second = s.reply(q)
    assert len(s.notes) == 1 and "dropped the oldest turn" in s.notes[0] and f"{ctx} tokens" in s.notes[0]
    assert s.messages == [{"role": "user", "content": q}] + ([{"role": "assistant", "content": second}] if second.strip() else [])
    s.reset()
    assert s.messages == [] and s.reply(q) == first  # greedy: the same question alone gets the same reply


def test_chat_errors_are_one_line(chat_ckpt, tmp_path, capsys, monkeypatch):
    folder, _ = chat_ckpt
    code, out, err = _run(["chat", "--checkpoint", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and str(tmp_path / "nowhere") in err and "Traceback" not in err
    code, out, err = _run(["chat", "--checkpoint", str(folder), "--message", "   "], capsys)
    assert code == 2 and "empty" in err and out == ""
    code, out, err = _run(["chat", "--checkpoint", str(folder), "--message", "kite " * 200], capsys)
    assert code == 2 and "shorten" in err and "64" in err
    # in the loop an over-long message is refused and the conversation goes on
    code, out, err = _run(["chat", "--checkpoint", str(folder)], capsys, "kite " * 200 + f"\n{QA[0][0]}\n", monkeypatch)
    assert code == 0 and "shorten" in out and f"assistant> {QA[0][1]}" in out
    code, _, err = _run(["chat"], capsys)
    assert code == 2 and "--checkpoint" in err


def test_tokenizer_without_chat_tokens_or_not_fine_tuned(chat_ckpt, tmp_path, capsys):
    import sentencepiece as spm
    folder, _ = chat_ckpt
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([s.text for s in StoryWorld().sample(50, seed=1)]),
                                   model_writer=buf, vocab_size=120, minloglevel=2)
    (plain / "tokenizer.model").write_bytes(buf.getvalue())
    code, _, err = _run(["chat", "--checkpoint", str(plain), "--message", "hi"], capsys)
    assert code == 2 and "chat-role tokens" in err and "<|user|>" in err and "Traceback" not in err
    # a checkpoint saved without the SFT mark still answers, with a note on stderr
    raw = tmp_path / "raw"
    shutil.copytree(folder, raw)
    from tinyllama.checkpoint import load_model
    save_checkpoint(raw, load_model(folder), step=1)
    code, out, err = _run(["chat", "--checkpoint", str(raw), "--message", QA[0][0]], capsys)
    assert code == 0 and out == QA[0][1] + "\n" and "no record of chat fine-tuning" in err


# ---------------------------------------------------------------- label

@pytest.fixture
def pairs_file(tmp_path):
    pairs = story_comparisons(3, seed=1)
    return write_pairs(tmp_path / "pairs.jsonl", pairs), pairs


def test_label_saves_each_answer_and_resumes(pairs_file, tmp_path, capsys, monkeypatch):
    path, pairs = pairs_file
    labels = tmp_path / "labels.jsonl"
    argv = ["label", "--pairs", str(path), "--out", str(labels), "--labeler", "tester"]
    code, out, _ = _run(argv, capsys, "a\nb\n", monkeypatch)  # the input ends after two answers
    assert code == 0 and "2 labels saved" in out
    got = read_labels(labels)
    assert [d["choice"] for d in got.decisions] == ["a", "b"] and not got.problems
    assert [pair_key(d["prompt"], d["a"], d["b"]) for d in got.decisions] == [p.key for p in pairs[:2]]
    assert all(d["labeler"] == "tester" for d in got.decisions)
    # a writer killed mid-line leaves a cut-off last line; the next session reports it and resumes
    with open(labels, "a") as f:
        f.write('{"id": "cut", "prompt": "Once')
    code, out, _ = _run(argv, capsys, "t\n", monkeypatch)
    assert code == 0 and "cut off" in out and "2 labels already" in out
    assert out.count("PROMPT:") == 1 and pairs[2].a in out  # only the pair without a label is shown
    got = read_labels(labels)
    assert [d["choice"] for d in got.decisions] == ["a", "b", "tie"] and len(got.problems) == 1
    # nothing is left: the next session says so, and undo brings the last pair back
    code, out, _ = _run(argv, capsys, "u\ns\nq\n", monkeypatch)
    assert code == 0 and "No pairs left" in out
    assert [d["choice"] for d in read_labels(labels).decisions] == ["a", "b", "skip"]


def test_label_demo_pairs(tmp_path, capsys, monkeypatch):
    labels = tmp_path / "sub" / "labels.jsonl"
    code, out, _ = _run(["label", "--demo", "2", "--out", str(labels)], capsys, "x\nb\nq\n", monkeypatch)
    assert code == 0 and "unknown answer" in out
    assert [d["choice"] for d in read_labels(labels).decisions] == ["b"]


def test_label_errors_are_one_line(pairs_file, tmp_path, capsys):
    path, _ = pairs_file
    labels = str(tmp_path / "labels.jsonl")
    code, _, err = _run(["label", "--pairs", str(tmp_path / "missing.jsonl"), "--out", labels], capsys)
    assert code == 2 and "missing.jsonl" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text().splitlines()[0] + "\n{not json\n")
    code, _, err = _run(["label", "--pairs", str(bad), "--out", labels], capsys)
    assert code == 2 and "line 2" in err and err.strip().count("\n") == 0
    (tmp_path / "empty.jsonl").write_text("\n")
    code, _, err = _run(["label", "--pairs", str(tmp_path / "empty.jsonl"), "--out", labels], capsys)
    assert code == 2 and "no pairs" in err
    (tmp_path / "nonutf8.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    code, _, err = _run(["label", "--pairs", str(tmp_path / "nonutf8.jsonl"), "--out", labels], capsys)
    assert code == 2 and "UTF-8" in err
    code, _, err = _run(["label", "--pairs", str(path), "--out", str(tmp_path)], capsys)
    assert code == 2 and "folder" in err
    code, _, err = _run(["label", "--out", labels], capsys)
    assert code == 2 and "--pairs" in err  # one of --pairs / --demo is required
    assert not os.path.exists(labels)


def test_label_is_chapter_12s_command():
    from tinyllama.cli import build_parser
    from tinyllama.feedback import label_command
    args = build_parser().parse_args(["label", "--demo", "1"])
    assert args.func is label_command  # one implementation: the CLI registers and calls chapter 12's


def test_help_lists_every_command(capsys):
    from tinyllama.cli import COMMANDS
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for name in COMMANDS:
        assert name in out, name
    assert set(COMMANDS) == {"pretrain", "sample", "speedrun", "chat", "label"}
