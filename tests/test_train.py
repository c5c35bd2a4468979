"""Tests of tinyllama.train (chapter 07): data windows, config checks, schedule, optimizer groups,
gradient accumulation, divergence, clean stops, held-out scoring, and DDP equivalence."""
import dataclasses, json, math, os, subprocess, sys, threading
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, os.path.dirname(__file__))
from _train_setup import TINY, RaggedTargets, tiny_setup, tiny_stream  # noqa: E402
from tinyllama.model import LLM, LLMConfig
from tinyllama.rmsnorm import RMSNorm
from tinyllama.checkpoint import load_checkpoint
from tinyllama.train import (IGNORE_INDEX, BatchSource, NextTokenPredictionDataset, PretrainPreset, TrainingConfig,
                             TrainingDiverged, LossPlot, heldout_split, lr_at, lr_schedule, make_optimizer,
                             param_groups, plot_losses, pretrain_preset, read_metrics, steps_overrides, story_nlls,
                             tokenize_stories, train)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# ---------- data
def test_windows_are_slices_of_the_stream_and_targets_are_shifted():
    stream = torch.arange(1000) * 7 % 997  # all distinct: a window's start is recoverable from its first token
    ds = NextTokenPredictionDataset(stream, context_size=12, seed=3)
    x, y = ds.batch(5, 16)
    assert x.shape == y.shape == (16, 12)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        start = int((stream == row_x[0]).nonzero())
        assert torch.equal(row_x, stream[start:start + 12]) and torch.equal(row_y, stream[start + 1:start + 13])

def test_batches_are_deterministic_for_seed_and_step():
    stream = tiny_stream()
    a, b = NextTokenPredictionDataset(stream, 16, seed=1), NextTokenPredictionDataset(stream, 16, seed=1)
    assert torch.equal(a.batch(7, 8)[0], b.batch(7, 8)[0])
    assert not torch.equal(a.batch(7, 8)[0], a.batch(8, 8)[0])
    assert not torch.equal(a.batch(7, 8)[0], NextTokenPredictionDataset(stream, 16, seed=2).batch(7, 8)[0])
    assert torch.equal(a[3][0], b[3][0]) and len(a) == len(stream) - 16
    # the windows are spread over the stream, not stuck at its start
    starts = torch.cat([a.batch(s, 64)[0][:, 0] for s in range(4)])
    assert starts.unique().numel() > 20

def test_ranks_split_the_global_batch():
    ds = NextTokenPredictionDataset(tiny_stream(), 16, seed=1)
    full, _ = ds.batch(3, 8)
    r0, _ = ds.batch(3, 8, rank=0, world_size=2)
    r1, _ = ds.batch(3, 8, rank=1, world_size=2)
    assert torch.equal(r0, full[0::2]) and torch.equal(r1, full[1::2])

@pytest.mark.parametrize("tokens, ctx, msg", [
    (torch.arange(10), 10, "one window needs"),
    (torch.arange(10).view(2, 5), 2, "1-D stream"),
    (torch.rand(20), 4, "integer ids"),
    (torch.arange(20), 0, "positive integer"),
])
def test_dataset_rejects_bad_input(tokens, ctx, msg):
    with pytest.raises(ValueError, match=msg):
        NextTokenPredictionDataset(tokens, ctx)

def test_batch_rejects_uneven_sharding():
    ds = NextTokenPredictionDataset(torch.arange(100), 4)
    with pytest.raises(ValueError, match="not divisible by world_size"):
        ds.batch(0, 5, rank=0, world_size=2)

class _FakeTokenizer:
    bos_id, eos_id, pad_id = 1, 2, 0
    def encode_batch(self, texts, bos=False, eos=False):
        return [[self.bos_id] * bos + [10 + len(w) for w in t.split()] + [self.eos_id] * eos for t in texts]

def test_tokenize_stories_frames_each_story():
    ids = tokenize_stories(["a bb", "ccc"], _FakeTokenizer())
    assert ids.tolist() == [1, 11, 12, 2, 1, 13, 2]
    with pytest.raises(ValueError, match="not one string"):
        tokenize_stories("a bb", _FakeTokenizer())

def test_heldout_split_cuts_at_a_story_boundary():
    ids = tokenize_stories(["a b c"] * 10, _FakeTokenizer())  # 10 stories of 5 tokens
    train_part, held = heldout_split(ids, 0.25, bos_id=1)
    assert len(train_part) + len(held) == len(ids) and held[0] == 1 and train_part[-1] == 2
    with pytest.raises(ValueError, match="between 0 and 1"):
        heldout_split(ids, 1.5)

# ---------- config and schedule
@pytest.mark.parametrize("field, value, msg", [
    ("steps", 0, "steps"), ("lr", -1.0, "lr"), ("min_lr", 1.0, "above lr"), ("warmup_steps", 500, "warmup_steps"),
    ("grad_accum_steps", 3, "not divisible by grad_accum_steps"), ("precision", "fp8", "precision"),
    ("beta2", 1.0, "beta2"), ("batch_size", 2.5, "batch_size"), ("device", "tpu", "device"),
])
def test_training_config_rejects_bad_values(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        TrainingConfig(**{"steps": 100, "batch_size": 8, "lr": 1e-3, "min_lr": 1e-4, field: value})

def test_lr_schedule_key_points():
    lr, min_lr, warm, steps = 1e-3, 1e-4, 10, 110
    assert lr_at(0, lr, min_lr, warm, steps) == pytest.approx(lr / warm)
    assert lr_at(warm - 1, lr, min_lr, warm, steps) == pytest.approx(lr)
    assert lr_at(warm, lr, min_lr, warm, steps) == pytest.approx(lr)  # the cosine starts at the peak
    assert lr_at(steps - 1, lr, min_lr, warm, steps) == pytest.approx(min_lr)  # and ends at min_lr
    mid = warm + (steps - 1 - warm) / 2  # halfway through the cosine: cos(pi/2) = 0
    assert lr_at(int(mid), lr, min_lr, warm, steps) == pytest.approx((lr + min_lr) / 2, rel=0.02)
    sched = lr_schedule(TrainingConfig(steps=steps, lr=lr, min_lr=min_lr, warmup_steps=warm))
    assert all(a < b for a, b in zip(sched[:warm], sched[1:warm]))  # rises during warmup
    assert all(a >= b for a, b in zip(sched[warm:], sched[warm + 1:]))  # never rises after it

def test_the_optimizer_uses_the_schedule():
    model, data, cfg = tiny_setup(steps=6)
    result = train(model, data, cfg, progress=False)
    assert [h["lr"] for h in result.history] == pytest.approx(lr_schedule(cfg))

def test_no_weight_decay_on_norms_and_embeddings():
    for tied in (False, True):
        model = LLM(LLMConfig(**TINY, tie_embeddings=tied))
        decay, no_decay = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        no_decay_names = {names[id(p)] for p in no_decay["params"]}
        norms = {n + ".weight" for n, m in model.named_modules() if isinstance(m, RMSNorm)}
        assert no_decay_names == norms | {"embed_tokens.weight"}
        assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0
        assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # a tied matrix once
        assert ("lm_head.weight" in {names[id(p)] for p in decay["params"]}) == (not tied)

# ---------- the loop
def test_gradient_accumulation_matches_one_big_batch():
    m1, data, c1 = tiny_setup(steps=4)
    m2, _, c2 = tiny_setup(steps=4, grad_accum_steps=2)
    l1, l2 = train(m1, data, c1, progress=False).losses(), train(m2, data, c2, progress=False).losses()
    assert l1 == pytest.approx(l2, abs=1e-6)
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)

def _first_step_grads(model, data, config):
    "The gradient the optimizer receives at the first step of `train` (unclipped)."
    grads = []
    def grab(opt, args, kwargs):
        grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]])
    handle = register_optimizer_step_pre_hook(grab)
    try:
        train(model, data, config, progress=False)
    finally:
        handle.remove()
    return grads[0]

@pytest.mark.parametrize("k", [2, 4, 8])
def test_accumulation_weighs_every_target_token_the_same(k):
    "Rows with 1 to 16 targets (chats): k micro-batches give the gradient and loss of the one big batch."
    model, data, c1 = tiny_setup(steps=1, ragged=True, grad_clip=0.0, warmup_steps=0)
    x, y = data.batch(0, c1.batch_size)
    with torch.no_grad():  # the step's loss: the mean over all its target tokens
        want = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX).item()
    big = _first_step_grads(model, data, c1)
    mk, _, ck = tiny_setup(steps=1, ragged=True, grad_clip=0.0, warmup_steps=0, grad_accum_steps=k)
    acc = _first_step_grads(mk, data, ck)
    for a, b in zip(big, acc):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-5)
    mk, _, ck = tiny_setup(steps=1, ragged=True, warmup_steps=0, grad_accum_steps=k)
    assert train(mk, data, ck, progress=False).losses()[0] == pytest.approx(want, rel=1e-6)
    # the micro-batches really are uneven (so a mean of their means would weigh tokens unequally)
    lens = [int((y[j * 8 // k:(j + 1) * 8 // k] != IGNORE_INDEX).sum()) for j in range(k)]
    assert max(lens) >= 3 * min(lens)

def test_ragged_training_matches_one_big_batch_over_steps():
    m1, data, c1 = tiny_setup(steps=4, ragged=True)
    m2, _, c2 = tiny_setup(steps=4, ragged=True, grad_accum_steps=4)
    l1, l2 = train(m1, data, c1, progress=False).losses(), train(m2, data, c2, progress=False).losses()
    assert l1 == pytest.approx(l2, abs=1e-6)  # (old mean of micro-batch means: 6e-2 apart)
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=n)  # (old: 1.5e-2)

def test_train_takes_any_batch_source_and_refuses_other_data():
    model, data, cfg = tiny_setup(steps=2)
    assert isinstance(data, BatchSource) and isinstance(RaggedTargets(data), BatchSource)
    assert train(model, RaggedTargets(data), cfg, progress=False).steps_done == 2
    for bad in (data.tokens, [data.tokens]):
        with pytest.raises(ValueError, match="batch source"):
            train(model, bad, cfg, progress=False)
    with pytest.raises(ValueError, match="eval_data must be a batch source"):
        train(model, data, cfg, eval_data=object(), progress=False)
    long = NextTokenPredictionDataset(tiny_stream(), context_size=32)
    with pytest.raises(ValueError, match="context_size"):
        train(model, long, cfg, progress=False)

def test_the_loss_falls_and_metrics_are_logged(tmp_path):
    model, data, cfg = tiny_setup(steps=30, out_dir=str(tmp_path), eval_every=10, eval_batches=2, log_every=5)
    seen = []
    result = train(model, data, cfg, eval_data=data, callback=seen.append, progress=False)
    assert result.history[-1]["loss"] < 0.8 * result.history[0]["loss"]
    assert [h["step"] for h in result.history] == [5, 10, 15, 20, 25, 30]
    assert [h["step"] for h in result.history if "eval_loss" in h] == [10, 20, 30]
    assert seen == result.history == read_metrics(tmp_path)
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"} <= set(seen[0])
    assert seen[-1]["tokens"] == 30 * cfg.batch_size * data.context_size

def _nan_after(model, n_calls):
    "A forward hook that turns the model's output into NaN from call n_calls + 1 on."
    calls = {"n": 0}
    def hook(module, args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] > n_calls else out
    return model.norm.register_forward_hook(hook)

def test_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    model, data, cfg = tiny_setup(steps=10, out_dir=str(tmp_path), checkpoint_every=2)
    _nan_after(model, 5)  # steps 1..5 are fine, step 6 produces NaN
    with pytest.raises(TrainingDiverged, match=r"nan at step 6.*intact"):
        train(model, data, cfg, progress=False)
    saved, state = load_checkpoint(tmp_path)
    assert state["step"] == 4
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    assert [h["step"] for h in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]

def test_a_huge_learning_rate_is_caught(tmp_path):
    model, data, cfg = tiny_setup(steps=30, lr=1e6, min_lr=0.0, grad_clip=0.0, warmup_steps=0)
    with pytest.raises(TrainingDiverged, match="Try a lower lr"):
        train(model, data, cfg, progress=False)

def test_stop_event_stops_cleanly_with_a_loadable_checkpoint(tmp_path):
    model, data, cfg = tiny_setup(steps=500, out_dir=str(tmp_path))
    stop, out = threading.Event(), {}
    def on_metrics(m):
        if m["step"] >= 3: stop.set()
    worker = threading.Thread(target=lambda: out.update(r=train(model, data, cfg, callback=on_metrics,
                                                                stop_event=stop, progress=False)))
    worker.start(); worker.join(timeout=60)
    assert not worker.is_alive()
    r = out["r"]
    assert r.stopped_early and r.steps_done == 3 == len(r.history)
    saved, state = load_checkpoint(tmp_path)
    assert state["step"] == 3
    for a, b in zip(saved.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)

# ---------- held-out scoring
def test_story_nll_equals_the_sum_of_token_losses():
    from tinyllama.tokenizer import train_tokenizer
    from tinyllama.data import story_corpus
    texts = story_corpus(60, seed=0)
    tok = train_tokenizer(texts, vocab_size=360)
    torch.manual_seed(0)
    model = LLM(LLMConfig(**{**TINY, "vocab_size": tok.vocab_size, "context_size": 200}))
    got = story_nlls(model, tok, texts[:5], batch_size=3)  # padded batches
    for text, nll in zip(texts[:5], got):
        ids = torch.tensor([tok.encode(text, bos=True, eos=True)])
        logp = torch.log_softmax(model(ids[:, :-1]), -1)[0]
        want = -logp.gather(1, ids[0, 1:, None]).sum().item()
        assert nll == pytest.approx(want, rel=1e-5)
    small = LLM(LLMConfig(**{**TINY, "vocab_size": tok.vocab_size}))
    with pytest.raises(ValueError, match="context_size"):
        story_nlls(small, tok, texts[:2])

def test_loss_plot_collects_and_draws():
    plot = LossPlot(floor=0.5, live=False)
    for s in range(1, 4): plot({"step": s, "loss": 2.0 / s, **({"eval_loss": 1.0} if s == 3 else {})})
    ax = plot.figure().axes[0]
    assert len(ax.lines) == 3 and list(ax.lines[0].get_ydata()) == [2.0, 1.0, 2.0 / 3]
    assert list(ax.lines[1].get_xdata()) == [3] and ax.get_yscale() == "log"

def test_plot_losses_draws_on_a_given_axes():
    from matplotlib.figure import Figure
    fig = Figure()
    left, right = fig.subplots(1, 2)
    got = plot_losses([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}], ax=right, title="SFT", ylabel="nats")
    assert got is fig and len(right.lines) == 1 and not left.lines and right.get_title() == "SFT"
    assert len(plot_losses([]).axes[0].lines) == 0  # an empty history is an empty plot, not an error

@pytest.mark.parametrize("profile", ["ci", "cpu", "gpu"])
def test_presets_are_valid_and_stories_fit_the_context(profile):
    from tinyllama.data import train_heldout
    from tinyllama.tokenizer import train_tokenizer
    from tinyllama.train import tokenizer_vocab_size
    preset = pretrain_preset(profile)
    model_kwargs, cfg = preset.model, preset.train
    LLMConfig(**model_kwargs)
    assert isinstance(preset, PretrainPreset) and isinstance(cfg, TrainingConfig)
    assert preset.profile == profile and 1.0 <= preset.band[0] < preset.band[1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.corpus = "tinystories"
    assert dataclasses.replace(preset, corpus="tinystories").corpus == "tinystories"
    stories, held = train_heldout(1500, 300, seed=0)  # the story world (also the gpu profile's offline fallback)
    tok = train_tokenizer([s.text for s in stories], vocab_size=tokenizer_vocab_size(preset, "story_world"))
    longest = max(len(tok.encode(s.text)) + 1 for s in held)  # tokens to predict: text + </s>
    assert longest <= model_kwargs["context_size"], "held-out stories would not fit the context for scoring"

def test_steps_overrides_shrink_warmup_and_evaluation():
    cfg = pretrain_preset("cpu").train
    assert steps_overrides(cfg, None) == {}
    for steps in (1, 5, 50, cfg.steps, 10 * cfg.steps):
        o = steps_overrides(cfg, steps)
        TrainingConfig(**{**dataclasses.asdict(cfg), **o})  # a valid config
        assert o["steps"] == steps and 0 <= o["warmup_steps"] <= min(steps, cfg.warmup_steps)

# ---------- DDP
@pytest.mark.slow
@pytest.mark.parametrize("ragged", [False, True])
def test_ddp_two_processes_match_one_process(ragged, tmp_path):
    "Two ranks give the curve and weights of one process; ragged: rows of 1 to 16 targets, 2 micro-batches."
    model, data, cfg = tiny_setup(ragged=ragged, **({"grad_accum_steps": 2} if ragged else {}))
    single = train(model, data, cfg, progress=False)
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).with_name("ddp_worker.py")), str(out)] + ["ragged"] * ragged,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(out.read_text())
    assert ddp["steps"] == cfg.steps
    assert ddp["losses"] == pytest.approx(single.losses(), abs=1e-5)  # the same curve up to float summation order
    for name, w in model.state_dict().items():
        torch.testing.assert_close(torch.tensor(ddp["weights"][name]), w, atol=1e-5, rtol=1e-4, msg=name)

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_follows_fp32_closely(precision, tmp_path):
    "bf16 autocast, and fp16 with a GradScaler (the T4 path), run on the CPU too and track the fp32 curve."
    m32, data, c32 = tiny_setup(steps=3)
    mlp, _, clp = tiny_setup(steps=3, precision=precision, out_dir=str(tmp_path))
    ref, got = train(m32, data, c32, progress=False).losses(), train(mlp, data, clp, progress=False).losses()
    assert got != ref and got == pytest.approx(ref, abs=0.02)
    state = load_checkpoint(tmp_path)[1]
    assert bool(state["extra"]["scaler"]) == (precision == "fp16")  # the loss scale is part of the state


@pytest.mark.parametrize("env, expected", [(None, 8), ("1", 1), ("3", 3), ("", 8), ("x", 8), ("0", 8)])
def test_auto_threads_take_omp_num_threads_when_it_is_set(monkeypatch, env, expected):
    "Runs launched together on an idle machine: OMP_NUM_THREADS=1 must keep each to one thread."
    import importlib

    train = importlib.import_module("tinyllama.train")  # the module, not the function
    monkeypatch.setattr(train.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(train.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    assert train.cpu_threads("auto") == expected
    assert train.cpu_threads(2) == 2  # an explicit count still wins over everything
