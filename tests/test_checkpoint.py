"""Tests of tinyllama.checkpoint (chapter 07b): round trips, atomic writes, clear errors on damaged
files, and exact resumption of training."""
import json, os, sys
from pathlib import Path
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _train_setup import TINY, tiny_setup  # noqa: E402
from tinyllama.model import LLM, LLMConfig
from tinyllama.checkpoint import (CONFIG_FILE, STATE_FILE, WEIGHTS_FILE, CheckpointError, atomic_write, load_checkpoint,
                                  load_model, rng_state, save_checkpoint, set_rng_state)
from tinyllama.train import make_optimizer, read_metrics, train


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

def _trained(tied=False, steps=2):
    torch.manual_seed(0)
    model = LLM(LLMConfig(**TINY, tie_embeddings=tied))
    _, _, cfg = tiny_setup(steps=steps)
    opt, sched = make_optimizer(model, cfg)
    for _ in range(steps):
        x = torch.randint(0, TINY["vocab_size"], (2, 8))
        model(x).logsumexp(-1).mean().backward()
        opt.step(); opt.zero_grad(); sched.step()
    return model, opt, sched, cfg

@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_restores_weights_optimizer_and_scheduler(tmp_path, tied):
    model, opt, sched, cfg = _trained(tied)
    save_checkpoint(tmp_path, model, opt, sched, step=2, extra={"data_seed": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE, STATE_FILE])  # no temp files
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["tie_embeddings"] is tied
    fresh = LLM(LLMConfig(**TINY, tie_embeddings=tied))
    opt2, sched2 = make_optimizer(fresh, cfg)
    loaded, state = load_checkpoint(tmp_path, fresh, opt2, sched2)
    assert loaded is fresh and state["step"] == 2 and state["extra"] == {"data_seed": 1}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert (fresh.lm_head.weight is fresh.embed_tokens.weight) == tied
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"): assert torch.equal(s1["state"][k][key], s2["state"][k][key])
    assert sched2.state_dict() == sched.state_dict() and sched2.get_last_lr() == sched.get_last_lr()

def test_trainer_state_loads_with_weights_only(tmp_path):
    model, opt, sched, _ = _trained()
    save_checkpoint(tmp_path, model, opt, sched, step=2)
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)  # no pickled code: safe to open from anyone
    assert state["step"] == 2 and "optimizer" in state and "rng" in state

def test_load_model_builds_the_model_from_config(tmp_path):
    model, *_ = _trained()
    save_checkpoint(tmp_path, model)
    loaded = load_model(tmp_path)
    assert not loaded.training and loaded.config == model.config
    x = torch.randint(0, TINY["vocab_size"], (1, 6))
    assert torch.equal(loaded(x), model.eval()(x))

def test_rng_state_round_trip():
    state = rng_state()
    a = (torch.rand(3), __import__("random").random())
    set_rng_state(state)
    b = (torch.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]

def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write(target, lambda p: Path(p).write_text("old"))
    def broken(p):
        Path(p).write_text("half-writ")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]

# ---------- damaged checkpoints
@pytest.fixture(scope="module")
def _saved_once(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    model, opt, sched, cfg = _trained()
    save_checkpoint(folder, model, opt, sched, step=2)
    return folder, cfg

@pytest.fixture
def saved(_saved_once, tmp_path):
    "A fresh copy of one saved checkpoint, free to damage."
    import shutil
    folder, cfg = _saved_once
    return Path(shutil.copytree(folder, tmp_path / "ckpt")), cfg

def _damage(path, how):
    data = path.read_bytes()
    if how == "truncate": path.write_bytes(data[: len(data) // 2])
    elif how == "flip":  # change one byte in the middle (the tensor data, not the header)
        i = len(data) * 3 // 4
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    elif how == "garbage": path.write_bytes(b"this is not a checkpoint")
    elif how == "delete": path.unlink()

@pytest.mark.parametrize("name, how", [
    (WEIGHTS_FILE, "truncate"), (WEIGHTS_FILE, "flip"), (WEIGHTS_FILE, "garbage"), (WEIGHTS_FILE, "delete"),
    (STATE_FILE, "truncate"), (STATE_FILE, "garbage"), (CONFIG_FILE, "garbage"), (CONFIG_FILE, "delete"),
])
def test_damaged_files_give_a_clear_error_naming_the_file(saved, name, how):
    folder, cfg = saved
    _damage(folder / name, how)
    model = LLM(LLMConfig(**TINY))
    opt, sched = make_optimizer(model, cfg)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(folder, model, opt, sched)

def test_resuming_needs_the_trainer_state(saved):
    folder, cfg = saved
    (folder / STATE_FILE).unlink()
    load_checkpoint(folder)  # the weights alone still load
    model = LLM(LLMConfig(**TINY))
    with pytest.raises(CheckpointError, match=STATE_FILE):
        load_checkpoint(folder, model, make_optimizer(model, cfg)[0])

def test_a_different_model_is_refused(saved):
    folder, _ = saved
    with pytest.raises(CheckpointError, match="different model"):
        load_checkpoint(folder, LLM(LLMConfig(**{**TINY, "dim_emb": 64})))
    with pytest.raises(CheckpointError, match="not a folder"):
        load_checkpoint(folder / "nope")

# ---------- exact resume
def test_resume_is_exact(tmp_path):
    """20 steps straight == 10 steps, stop, resume from the checkpoint, 10 more steps: identical losses and
    weights, compared bitwise (torch.equal / ==), on the CPU in fp32."""
    straight_model, data, cfg = tiny_setup(steps=20)
    straight = train(straight_model, data, cfg, progress=False)

    class StopAfter:  # a stop_event that fires after 10 steps
        def __init__(self, n): self.n, self.calls = n, 0
        def is_set(self): self.calls += 1; return self.calls > self.n
    model_a, _, cfg_b = tiny_setup(steps=20, out_dir=str(tmp_path))
    first = train(model_a, data, cfg_b, stop_event=StopAfter(10), progress=False)
    assert first.stopped_early and first.steps_done == 10
    torch.manual_seed(1234)  # a different global RNG and fresh weights: resume must restore everything
    model_b = LLM(LLMConfig(**TINY))
    second = train(model_b, data, cfg_b, resume=True, progress=False)
    assert second.steps_done == 20 and not second.stopped_early
    assert first.losses() + second.losses() == straight.losses()  # bitwise
    for (name, a), b in zip(straight_model.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["step"] for h in read_metrics(tmp_path)] == list(range(1, 21))  # one log, no duplicated steps
