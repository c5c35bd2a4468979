"""The chapter functions the `tinyllama` command calls (issue 9: the CLI only parses
arguments): pretrain_preset's corpus, PretrainRun.summary, load_model_and_tokenizer,
load_chat_model, ChatSession.loop, print_continuations and the speedrun's run_pipeline."""
import io
import os
import shutil
from contextlib import redirect_stdout
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
from tinyllama import speedrun  # noqa: E402
from tinyllama.checkpoint import (  # noqa: E402
    CheckpointError, load_model_and_tokenizer, load_tokenizer, save_checkpoint)
from tinyllama.data import StoryWorld  # noqa: E402
from tinyllama.generate import DEFAULT_PROMPTS, generate_text, print_continuations  # noqa: E402
from tinyllama.model import LLM, LLMConfig  # noqa: E402
from tinyllama.sft import ChatSession, load_chat_model  # noqa: E402
from tinyllama.tokenizer import train_tokenizer  # noqa: E402
from tinyllama.train import PretrainRun, pretrain_preset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny matrices


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([s.text for s in StoryWorld().sample(200, seed=0)], vocab_size=400)


def _model(tok, context_size=48):
    torch.manual_seed(0)
    return LLM(LLMConfig(vocab_size=tok.vocab_size, context_size=context_size, dim_emb=32,
                         num_layers=1, num_heads=4, num_kv_heads=2, ffd_hidden_dim=64)).eval()


@pytest.fixture
def folder(tmp_path, tok):
    "A checkpoint folder as `pretrain` writes it: weights, config, state, tokenizer.model."
    out = tmp_path / "ckpt"
    save_checkpoint(out, _model(tok), step=3, extra={"stage": "sft"})
    tok.save(out / "tokenizer.model")
    return out


# ------------------------------------------------------------- chapter 07

def test_pretrain_preset_takes_a_corpus():
    for profile in ("ci", "cpu", "gpu"):
        base = pretrain_preset(profile)
        assert pretrain_preset(profile, None) == base  # None: the profile's corpus
        for corpus in ("story_world", "tinystories"):
            p = pretrain_preset(profile, corpus)
            assert p.corpus == corpus and p.model == base.model and p.train == base.train
    assert pretrain_preset("gpu").corpus == "tinystories"
    with pytest.raises(ValueError, match="story_world"):
        pretrain_preset("ci", "wikipedia")


def test_pretrain_run_summary():
    res = SimpleNamespace(steps_done=20, wall_s=3.0, tokens_per_s=12345.6, final_loss=2.5,
                          final_eval_loss=None)
    run = PretrainRun(None, None, res, "story_world", [])
    assert run.summary() == "20 steps in 3 s, 12,346 tokens/s; final loss 2.500 nats/token"
    res.final_eval_loss = 2.75
    run.comparison = "NLL 30 vs floor 29"
    assert run.summary().splitlines() == [
        "20 steps in 3 s, 12,346 tokens/s; final loss 2.500, held-out 2.750 nats/token",
        "NLL 30 vs floor 29"]


# ------------------------------------------------------------- chapter 07b

def test_load_model_and_tokenizer(folder, tok):
    model, tok2 = load_model_and_tokenizer(folder)
    assert not model.training and tok2.vocab_size == tok.vocab_size
    assert tok2.encode("Tom had a red kite.") == tok.encode("Tom had a red kite.")
    for a, b in zip(model.state_dict().values(), _model(tok).state_dict().values()):
        assert torch.equal(a, b)
    assert load_tokenizer(str(folder)).vocab_size == tok.vocab_size  # a str works too


def test_load_model_and_tokenizer_errors_name_the_file(folder, tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_model_and_tokenizer(tmp_path / "nowhere")
    (folder / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.model is missing"):
        load_model_and_tokenizer(folder)


# ------------------------------------------------------------- chapter 09

def test_load_chat_model(folder, tok, tmp_path):
    model, tok2, chat_trained = load_chat_model(str(folder))
    assert chat_trained and not model.training and tok2.vocab_size == tok.vocab_size
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    save_checkpoint(plain, model, step=1)  # no record of chat fine-tuning
    assert load_chat_model(plain)[2] is False
    other = train_tokenizer([s.text for s in StoryWorld().sample(100, seed=1)], vocab_size=360)
    other.save(plain / "tokenizer.model")
    with pytest.raises(CheckpointError, match="do not belong together"):
        load_chat_model(plain)


def test_load_chat_model_names_missing_chat_tokens(folder):
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([s.text for s in StoryWorld().sample(50, seed=1)]),
                                   model_writer=buf, vocab_size=120, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"no chat-role tokens \(.*<\|user\|>"):
        load_chat_model(folder)


class _Scripted:
    "A session whose replies are scripted: the loop's own behaviour, nothing else."

    def __init__(self, lines):
        self.lines, self.asked = list(lines), []

    def read(self, prompt):
        assert prompt == "you> "
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)


def test_chat_loop_commands_and_end_of_input(tok, monkeypatch):
    session = ChatSession(_model(tok), tok)
    replies = iter(["red", "Tom"])

    def reply(text):
        if "long" in text:
            raise ValueError("the message takes 99 tokens; shorten it")
        session.notes = ["dropped the oldest turn"] if text == "second" else []
        return next(replies)

    monkeypatch.setattr(session, "reply", reply)
    resets = []
    monkeypatch.setattr(session, "reset", lambda: resets.append(1))
    script = _Scripted(["first", "too long", "/nonsense", "second", "/RESET", "/quit", "never"])
    with redirect_stdout(io.StringIO()) as out:
        assert session.loop(script.read, name="runs/x/sft") is None
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"chatting with runs/x/sft (context {session.context} tokens)")
    assert lines[1:] == ["assistant> red", "(the message takes 99 tokens; shorten it)",
                         "(unknown command '/nonsense': /reset starts over, /quit ends)",
                         "(dropped the oldest turn)", "assistant> Tom", "(a new conversation)"]
    assert resets == [1] and script.lines == ["never"]  # /quit stops reading
    with redirect_stdout(io.StringIO()) as out:  # the end of the input ends it too
        session.loop(_Scripted([]).read)
    assert "chatting with the model" in out.getvalue()


# ------------------------------------------------------------- chapter 08

def test_print_continuations_streams_what_generate_text_returns(tok):
    model = _model(tok)
    prompts = ["Once upon a time,", "Tom"]
    with redirect_stdout(io.StringIO()) as out:
        texts = print_continuations(model, tok, prompts, 6, temperature=0.9, top_k=20, seed=5)
    for i, (p, t) in enumerate(zip(prompts, texts)):  # prompt i samples with seed + i
        assert t == generate_text(model, tok, [p], 6, temperature=0.9, top_k=20, seed=5 + i)[0]
    assert out.getvalue() == "".join(f"{p}{t}\n\n" for p, t in zip(prompts, texts))
    # None and a limit past the context both stop at the context's end
    with redirect_stdout(io.StringIO()):
        full = print_continuations(model, tok, ["Tom"], None, temperature=0)
        assert print_continuations(model, tok, ["Tom"], 1000, temperature=0) == full
    assert full == generate_text(model, tok, ["Tom"], None, temperature=0)  # to the end
    assert DEFAULT_PROMPTS and all(isinstance(p, str) for p in DEFAULT_PROMPTS)


def test_print_continuations_refuses_bad_prompts(tok):
    model = _model(tok, context_size=8)
    with pytest.raises(ValueError, match="shorten it"):
        print_continuations(model, tok, ["Tom had a red kite and a big blue ball."])
    for bad in ("Tom", []):
        with pytest.raises(ValueError, match="list of strings"):
            print_continuations(model, tok, bad)


# ------------------------------------------------------------- appendix E

def test_run_pipeline_checks_then_runs_and_prints(tmp_path, monkeypatch, capsys):
    def fake(run):
        run.state.update(band_ok=False, sft_checkpoint=run.out / "sft")
        return speedrun.Section("Fake", "body", [speedrun.Metric("answer", "42")])

    monkeypatch.setattr(speedrun, "SPEEDRUN_STAGES", [("fake", fake), ("other", fake)])
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        speedrun.run_pipeline(speedrun.Speedrun("ci", tmp_path / "never", stages="nope"))
    assert not (tmp_path / "never").exists()
    run = speedrun.Speedrun("ci", tmp_path / "run", stages="fake")
    report = speedrun.run_pipeline(run)
    assert report == tmp_path / "run" / "report.md" and "| answer | 42 |" in report.read_text()
    out = capsys.readouterr().out
    assert out.startswith(f"speedrun (ci profile: fake) into {tmp_path / 'run'}\n")
    assert "| answer | 42 |" in out and f"report: {report}" in out
    assert "outside the band" in out and f"--checkpoint {tmp_path / 'run' / 'sft'}" in out
    with pytest.raises(ValueError, match="already holds a speedrun report"):
        speedrun.run_pipeline(speedrun.Speedrun("ci", tmp_path / "run"))
