"""Tests of tinyllama.widgets: the training and PPO panels, driven as a reader drives it (set fields, click
Start / Stop, wait), plus its validation, plotting and sampling helpers. ipywidgets objects are
plain Python, so no kernel is needed."""
import threading
import time

import pytest
import torch

from tinyllama.checkpoint import load_checkpoint
from tinyllama.model import LLM, LLMConfig
from tinyllama.ppo import PPOConfig
from tinyllama.profiles import get_profile
from tinyllama.train import pretrain_preset
from tinyllama import widgets
from tinyllama.widgets import (MODEL_FIELDS, TrainingPanel, configs_from_fields, field_problem, loss_png,
                               panel_defaults, sample_texts)
from tinyllama.widgets import PPO_FIELDS, PPOPanel, RunPanel, ppo_config_from_fields

# A model and run small enough that a panel run takes a second or two on 2 CPU cores.
TINY = dict(vocab_size=320, dim_emb=32, num_layers=1, num_heads=4, num_kv_heads=2, context_size=32,
            batch_size=8, lr=3e-3, steps=30)


def tiny_panel(tmp_path, **fields):
    return TrainingPanel(profile="ci", out_dir=tmp_path / "run", n_stories=200).set(**{**TINY, **fields})


def wait_until(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def state_dicts_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


# ---------------------------------------------------------------- defaults and validation

@pytest.mark.parametrize("name", ["ci", "cpu", "gpu"])
def test_fields_start_from_the_profile_preset(name):
    preset = pretrain_preset(get_profile(name))
    model_kwargs, run = preset.model, preset.train
    values, base = panel_defaults(name)
    for f in MODEL_FIELDS:
        if f in model_kwargs:
            assert values[f] == model_kwargs[f], f
    assert (values["batch_size"], values["lr"], values["steps"], values["precision"]) == \
        (run.batch_size, run.lr, run.steps, run.precision)
    assert base == run
    assert field_problem(values, base) is None  # every preset is a valid run
    model, _ = configs_from_fields(values, base)
    assert model == LLMConfig(**model_kwargs)  # the SwiGLU width rule reproduces the preset's ffd_hidden_dim too


def test_panel_fields_hold_the_defaults():
    panel = TrainingPanel(profile="ci", n_stories=200)
    values, _ = panel_defaults("ci")
    assert panel.values() == values
    assert panel.thread is None and not panel.running
    assert panel.stop_button.disabled and not panel.start_button.disabled


def test_configs_from_fields_carry_every_field():
    values, base = panel_defaults("ci")
    values.update(TINY)
    model, run = configs_from_fields(values, base)
    assert isinstance(model, LLMConfig)
    for f in MODEL_FIELDS:
        assert getattr(model, f) == values[f]
    assert (run.batch_size, run.lr, run.steps, run.device) == (8, 3e-3, 30, values["device"])
    assert run.min_lr == pytest.approx(3e-3 * base.min_lr / base.lr)  # the preset's decay ratio is kept
    assert run.warmup_steps <= run.steps
    assert run.compile is False  # quick runs of changing shapes: compiling would cost more than it saves
    assert (run.weight_decay, run.grad_clip, run.seed) == (base.weight_decay, base.grad_clip, base.seed)


BAD = [
    (dict(num_heads=5), "num_heads"),  # 5 does not divide 32
    (dict(num_kv_heads=3), "num_kv_heads"),  # 3 does not divide 4
    (dict(dim_emb=36, num_heads=4), "odd"),  # head_dim 9: RoPE needs an even head dimension
    (dict(lr=0.0), "lr"),
    (dict(lr=-1e-3), "lr"),
    (dict(steps=0), "steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(context_size=0), "context_size"),
    (dict(num_layers=-1), "num_layers"),
]


@pytest.mark.parametrize("bad, word", BAD)
def test_field_problem_names_what_is_wrong(bad, word):
    values, base = panel_defaults("ci")
    values.update({**TINY, **bad})
    problem = field_problem(values, base)
    assert problem is not None and word in problem
    with pytest.raises(ValueError):
        configs_from_fields(values, base)


@pytest.mark.parametrize("bad, word", BAD)
def test_invalid_fields_show_a_message_and_start_nothing(tmp_path, bad, word):
    panel = tiny_panel(tmp_path, **bad)
    assert word in panel.summary.value  # shown as soon as the field changes
    panel.start_button.click()  # no exception escapes the click
    assert panel.thread is None and not panel.running
    assert word in panel.message.value and panel.message_kind == "error"
    assert not (tmp_path / "run").exists() and panel.run_dir is None  # nothing was written


def test_a_device_this_machine_lacks_is_refused():
    values, base = panel_defaults("ci")
    values["device"] = "tpu"
    assert "not available" in field_problem(values, base)


def test_constructor_rejects_a_bad_token_stream():
    with pytest.raises(ValueError, match="1-D"):
        TrainingPanel(profile="ci", train_tokens=torch.zeros(2, 10, dtype=torch.long))


def test_set_rejects_unknown_fields():
    with pytest.raises(ValueError, match="no field named"):
        TrainingPanel(profile="ci", n_stories=200).set(heads=4)


# ---------------------------------------------------------------- runs

def test_start_trains_and_the_loss_falls(tmp_path):
    panel = tiny_panel(tmp_path)
    panel.start_button.click()
    assert panel.running and panel.start_button.disabled and not panel.stop_button.disabled
    result = panel.wait(timeout=120)
    assert result is not None and not panel.running and panel.error is None, panel.message.value
    assert result.steps_done == TINY["steps"] and not result.stopped_early
    losses = [m["loss"] for m in panel.history if m.get("loss") is not None]
    assert len(losses) >= 10
    early, late = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert late < 0.8 * early, (early, late)
    # the panel shows the end of the run
    assert panel.progress.value == TINY["steps"] and panel.progress.max == TINY["steps"]
    assert f"step {TINY['steps']}" in panel.status.value and "loss" in panel.status.value
    assert panel.message_kind == "ok" and "Finished" in panel.message.value
    assert panel.plot.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(panel.samples) == len(panel.prompts) and all(isinstance(s, str) for s in panel.samples)
    assert "Samples" in panel.samples_view.value
    assert not panel.start_button.disabled and panel.stop_button.disabled
    # the checkpoint, in the run's own folder, holds the trained weights
    assert panel.run_dir == panel.out_dir / "run-001"
    loaded, _ = load_checkpoint(panel.run_dir)
    assert state_dicts_equal(loaded, panel.model)


@pytest.mark.slow
def test_stop_ends_the_run_cleanly_and_keeps_a_checkpoint(tmp_path):
    panel = tiny_panel(tmp_path, steps=100_000)
    panel.start_button.click()
    wait_until(lambda: len(panel.history) >= 3 or not panel.running)
    assert panel.running, panel.message.value
    panel.stop_button.click()
    result = panel.wait(timeout=60)
    assert not panel.running and not panel.thread.is_alive()
    assert panel.error is None, panel.message.value
    assert result.stopped_early and 3 <= result.steps_done < 100_000
    assert "Stopped" in panel.message.value and panel.message_kind == "ok"
    loaded, state = load_checkpoint(panel.run_dir)
    assert state_dicts_equal(loaded, panel.model)
    assert state["step"] == result.steps_done


def test_clicking_start_twice_starts_one_run(tmp_path):
    before = threading.active_count()
    panel = tiny_panel(tmp_path, steps=100_000)
    panel.start_button.click()
    first = panel.thread
    panel.start_button.click()
    assert panel.thread is first
    assert "already" in panel.message.value
    assert threading.active_count() == before + 1
    panel.stop_button.click()
    assert panel.wait(timeout=60).stopped_early


@pytest.mark.slow
def test_a_second_run_after_the_first_ends_starts_fresh(tmp_path):
    panel = tiny_panel(tmp_path, steps=5)
    panel.start_button.click()
    first = panel.wait(timeout=60)
    panel.set(steps=6)
    panel.start_button.click()
    second = panel.wait(timeout=60)
    assert (first.steps_done, second.steps_done) == (5, 6)
    assert [m["step"] for m in panel.history if m.get("loss") is not None][-1] == 6
    # each run kept its own checkpoint
    assert (first.out_dir, second.out_dir) == (str(panel.out_dir / "run-001"), str(panel.out_dir / "run-002"))
    assert load_checkpoint(first.out_dir)[1]["step"] == 5 and load_checkpoint(second.out_dir)[1]["step"] == 6


def test_an_error_in_the_training_thread_is_a_message(tmp_path, monkeypatch):
    def broken_train(*args, **kwargs):
        raise RuntimeError("the loss became nan at step 3")
    monkeypatch.setattr(widgets, "train", broken_train)
    panel = tiny_panel(tmp_path)
    panel.start_button.click()
    assert panel.wait(timeout=30) is None
    assert isinstance(panel.error, RuntimeError)
    assert "nan at step 3" in panel.message.value and panel.message_kind == "error"
    assert not panel.start_button.disabled and panel.stop_button.disabled  # ready for another try


def test_given_tokenizer_and_tokens_are_used(tmp_path):
    from tinyllama.data import story_corpus
    from tinyllama.tokenizer import train_tokenizer
    from tinyllama.train import tokenize_stories
    texts = story_corpus(150, seed=3)
    tok = train_tokenizer(texts, vocab_size=320)
    tokens = tokenize_stories(texts, tok)
    panel = TrainingPanel(profile="ci", out_dir=tmp_path, tokenizer=tok, train_tokens=tokens)
    assert panel.values()["vocab_size"] == 320 and panel.fields["vocab_size"].disabled
    panel.set(**{k: v for k, v in TINY.items() if k not in ("vocab_size", "steps")}, steps=4)
    panel.start_button.click()
    assert panel.wait(timeout=60).steps_done == 4
    assert panel.tokenizer is tok and panel.model.config.vocab_size == 320
    assert panel.fields["vocab_size"].disabled  # still fixed after the run


def test_a_vocabulary_smaller_than_the_tokens_is_a_message(tmp_path):
    tokens = torch.arange(500) % 400  # ids up to 399
    panel = TrainingPanel(profile="ci", out_dir=tmp_path, train_tokens=tokens).set(**TINY)  # vocab 320 < 400
    panel.start_button.click()
    assert panel.thread is None and "vocab_size" in panel.message.value


# ---------------------------------------------------------------- helpers

def test_loss_png_is_a_png_for_empty_and_full_histories():
    assert loss_png([])[:4] == b"\x89PNG"
    hist = [dict(step=i, loss=5.0 / i) for i in range(1, 20)] + [dict(step=10, loss=0.5, eval_loss=0.6)]
    assert loss_png(hist, floor=0.3)[:4] == b"\x89PNG"


def test_sample_texts_fits_the_context():
    from tinyllama.data import story_corpus
    from tinyllama.tokenizer import train_tokenizer
    tok = train_tokenizer(story_corpus(100), vocab_size=320)
    model = LLM(LLMConfig(vocab_size=320, context_size=24, dim_emb=16, num_layers=1, num_heads=2, num_kv_heads=1,
                          ffd_hidden_dim=32))
    out = sample_texts(model, tok, ["Once upon a time", ""], max_new_tokens=80)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    assert model.training  # the model's mode is restored


def test_a_new_panel_never_overwrites_an_earlier_run(tmp_path):
    (tmp_path / "run" / "run-001").mkdir(parents=True)  # left by an earlier panel
    panel = tiny_panel(tmp_path, steps=2)
    panel.start_button.click()
    assert panel.wait(timeout=60).steps_done == 2
    assert panel.run_dir == tmp_path / "run" / "run-002"
    assert not any((tmp_path / "run" / "run-001").iterdir())


def test_story_data_is_cached_and_its_floor_is_below_the_start_loss():
    from tinyllama.widgets import story_data
    tok, train_t, eval_t, floor = story_data(50, 10, 320)
    assert story_data(50, 10, 320)[1] is train_t
    assert train_t[0] == tok.bos_id and (train_t == tok.eos_id).sum() == 50 and (eval_t == tok.eos_id).sum() == 10
    assert 0 < floor < torch.log(torch.tensor(320.0)).item()  # a uniform guess (the untrained loss) is far above


def test_close_stops_the_run_and_closes_every_widget(tmp_path):
    panel = tiny_panel(tmp_path, steps=100_000)
    parts = [panel.widget, panel.start_button, panel.stop_button, panel.plot, panel.message, *panel.fields.values()]
    assert all(w.comm is not None for w in parts)
    panel.start_button.click()
    wait_until(lambda: len(panel.history) >= 1 or not panel.running)
    panel.close()
    assert not panel.running and panel.result.stopped_early
    assert all(w.comm is None for w in parts + [panel.fields["lr"].layout, panel.fields["lr"].style])


def test_the_cost_line_counts_flops_as_the_model_does():
    # a long context, so that the attention term (12·L·T·d per token) weighs in the estimate
    panel = TrainingPanel(profile="ci", n_stories=200).set(**{**TINY, "context_size": 512})
    model, run = configs_from_fields(panel.values(), panel.base_config)
    flops = model.flops_per_token() * run.steps * run.batch_size * model.context_size
    assert f"≈ {flops / 1e12:.2g} TFLOP" in panel.summary_text


# ---------------------------------------------------------------- the PPO panel

FIVE = 5  # the token the tiny task rewards


def five_reward(prompt_ids, response_ids):
    "+1 for each token 5 in the response (PAD after EOS is masked out by the trainer)."
    return (response_ids == FIVE).float()


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    return LLM(
        LLMConfig(
            vocab_size=8,
            context_size=12,
            dim_emb=16,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            ffd_hidden_dim=32,
        )
    )


TINY_PROMPTS = [
    [1, 4 + (i % 4), 4 + (i // 4) % 4] for i in range(16)
]  # BOS and two tokens; no PAD (3)
TINY_PPO = PPOConfig(
    batch_size=16, mini_batch_size=8, ppo_epochs=2, lr=1e-2, max_new_tokens=4
)


def ppo_panel(steps=8, reward_fn=five_reward, **kw):
    "A PPO panel on the tiny task: a run of a few steps takes about a second."
    decode = lambda ids: " ".join(map(str, ids))
    return PPOPanel(
        tiny_policy(),
        reward_fn,
        TINY_PROMPTS,
        decode,
        **{**dict(config=TINY_PPO, steps=steps), **kw},
    )


def test_both_panels_are_run_panels():
    assert issubclass(TrainingPanel, RunPanel) and issubclass(PPOPanel, RunPanel)
    for name in (
        "_on_start",
        "_on_stop",
        "_run",
        "_draw",
        "wait",
        "close",
        "set",
        "values",
        "_say",
    ):
        assert name not in vars(TrainingPanel) and name not in vars(PPOPanel), (
            name
        )  # shared, not copied


def test_ppo_fields_start_from_the_config_and_the_policy_device():
    panel = ppo_panel(steps=7)
    assert list(panel.fields) == list(PPO_FIELDS)
    assert panel.values() == dict(
        init_kl_coef=TINY_PPO.init_kl_coef,
        temperature=TINY_PPO.temperature,
        lr=TINY_PPO.lr,
        steps=7,
        batch_size=16,
        device="cpu",
    )
    assert panel.thread is None and not panel.running and panel.stop_button.disabled
    assert "16 responses" in panel.summary_text and "M parameters" in panel.summary_text


@pytest.mark.slow
def test_ppo_start_runs_ppo_and_the_stats_arrive():
    start = tiny_policy()
    panel = ppo_panel(steps=12)
    panel.start()
    assert (
        panel.running and panel.start_button.disabled and not panel.stop_button.disabled
    )
    result = panel.wait(timeout=120)
    assert result is not None and panel.error is None, panel.message_text
    assert result.steps_done == 12 and not result.stopped_early
    assert len(panel.history) == 12
    for key in (
        "env/reward_mean",
        "objective/kl",
        "policy/approxkl",
        "policy/clipfrac",
    ):
        assert all(key in s for s in panel.history), key
    rewards = [s["env/reward_mean"] for s in panel.history]
    assert sum(rewards[-3:]) > sum(rewards[:3]), rewards  # PPO finds the rewarded token
    assert panel.history[-1]["objective/kl"] > 0  # and moves away from the reference
    assert (
        panel.progress.value == 12
        and "step 12/12" in panel.status.value
        and "reward" in panel.status.value
    )
    assert panel.plot.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        len(panel.samples) == 3
        and "Samples" in panel.samples_view.value
        and "→" in panel.samples_view.value
    )
    assert panel.message_kind == "ok" and "Finished 12 steps" in panel.message_text
    assert (
        panel.policy is panel.trainer.policy and panel.trainer.history == panel.history
    )
    assert state_dicts_equal(
        panel.start_policy, start
    )  # the policy given is left as it was
    assert not panel.start_button.disabled and panel.stop_button.disabled


@pytest.mark.slow
def test_ppo_stop_ends_cleanly_and_keeps_the_policy_it_reached():
    panel = ppo_panel(steps=100_000)
    panel.start_button.click()
    wait_until(lambda: len(panel.history) >= 3 or not panel.running)
    assert panel.running, panel.message_text
    panel.stop_button.click()
    result = panel.wait(timeout=60)
    assert not panel.running and panel.error is None, panel.message_text
    assert result.stopped_early and 3 <= result.steps_done < 100_000
    assert (
        result.steps_done == len(panel.history) == panel.trainer.n_steps
    )  # nothing ran after the callback said stop
    assert "Stopped at step" in panel.message_text and panel.message_kind == "ok"
    assert not state_dicts_equal(
        panel.policy, panel.start_policy
    )  # the policy PPO reached is kept
    assert state_dicts_equal(panel.start_policy, tiny_policy())


@pytest.mark.parametrize(
    "bad, word",
    [
        (dict(init_kl_coef=-0.1), "init_kl_coef"),
        (dict(temperature=0.0), "temperature"),
        (dict(lr=0.0), "lr"),
        (dict(steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_ppo_bad_fields_give_a_message_and_start_nothing(bad, word):
    panel = ppo_panel().set(**bad)
    assert word in panel.summary_text
    panel.start()
    assert panel.thread is None and panel.trainer is None and not panel.running
    assert word in panel.message_text and panel.message_kind == "error"


@pytest.mark.slow
def test_ppo_double_start_starts_one_run():
    before = threading.active_count()
    panel = ppo_panel(steps=100_000)
    panel.start()
    first = panel.thread
    panel.start()
    assert panel.thread is first and "already" in panel.message_text
    assert threading.active_count() == before + 1
    panel.stop()
    assert panel.wait(timeout=60).stopped_early


@pytest.mark.slow
def test_ppo_an_error_in_the_thread_is_a_message():
    def broken(prompt_ids, response_ids):
        raise RuntimeError("the reward model is on another device")

    panel = ppo_panel(reward_fn=broken)
    panel.start()
    assert panel.wait(timeout=30) is None
    assert isinstance(panel.error, RuntimeError) and panel.error.__traceback__ is None
    assert "another device" in panel.message_text and panel.message_kind == "error"
    assert (
        not panel.start_button.disabled and panel.stop_button.disabled
    )  # ready for another try


def test_a_device_this_machine_lacks_is_refused_by_both_panels():
    values = dict(
        init_kl_coef=0.05, temperature=1.0, lr=1e-3, steps=5, batch_size=8, device="tpu"
    )
    with pytest.raises(ValueError, match="not available"):
        ppo_config_from_fields(values, PPOConfig())
    for panel in (ppo_panel(), TrainingPanel(profile="ci", n_stories=200)):
        before = panel.values()["device"]  # cpu here, cuda on a GPU machine
        with pytest.raises(ValueError, match="'tpu' is not available here"):
            panel.set(device="tpu")
        assert panel.values()["device"] == before  # the refused choice left no trace


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ppo_panel_trains_on_cuda():
    panel = ppo_panel(steps=3).set(device="cuda")
    panel.start()
    assert panel.wait(timeout=120).steps_done == 3, panel.message_text
    assert panel.policy.embed_tokens.weight.device.type == "cuda"
    assert panel.start_policy.embed_tokens.weight.device.type == "cpu"


@pytest.mark.slow
def test_ppo_prompts_from_a_function_are_cut_or_cycled_to_the_batch():
    calls = []

    def prompts(step):
        calls.append(step)
        return TINY_PROMPTS[:5]

    panel = PPOPanel(tiny_policy(), five_reward, prompts, str, TINY_PPO, steps=2).set(
        batch_size=12
    )
    panel.start()
    assert panel.wait(timeout=60).steps_done == 2, panel.message_text
    assert calls == [0, 1] and panel.trainer.last_rollout.prompt_ids.shape[0] == 12


def test_ppo_panel_rejects_bad_arguments():
    with pytest.raises(ValueError, match="policy must be an LLM"):
        PPOPanel("model", five_reward, TINY_PROMPTS, str)
    with pytest.raises(ValueError, match="prompts must be"):
        PPOPanel(tiny_policy(), five_reward, [], str)
    with pytest.raises(ValueError, match="reward_fn must be a function"):
        PPOPanel(tiny_policy(), None, TINY_PROMPTS, str)
    with pytest.raises(ValueError, match="config must be a PPOConfig"):
        PPOPanel(tiny_policy(), five_reward, TINY_PROMPTS, str, config=dict(lr=1e-3))


@pytest.mark.slow
def test_ppo_close_stops_the_run_and_closes_the_widgets():
    panel = ppo_panel(steps=100_000)
    parts = [panel.widget, panel.start_button, panel.plot, *panel.fields.values()]
    panel.start()
    wait_until(lambda: len(panel.history) >= 1 or not panel.running)
    panel.close()
    assert not panel.running and panel.result.stopped_early
    assert all(w.comm is None for w in parts)


# ---------------------------------------------------------------- the DPO and GRPO panels

import dataclasses  # noqa: E402
import math  # noqa: E402

from tinyllama.dpo import DPOPreset, DPOTrainer, dpo_preset  # noqa: E402
from tinyllama.grpo import GRPOConfig  # noqa: E402
from tinyllama.reward import PreferencePair, story_preference_pairs  # noqa: E402
from tinyllama.widgets import (DPO_FIELDS, DPOPanel, GRPO_FIELDS, GRPOPanel, PolicyPanel,  # noqa: E402
                               RewardPanel, dpo_preset_from_fields, grpo_config_from_fields)

TINY_DPO = dataclasses.replace(dpo_preset("ci"), steps=8, batch_size=8, lr=3e-3, beta=0.1, eval_every=2)


@pytest.fixture(scope="module")
def story_tok():
    from tinyllama.data import default_world
    from tinyllama.tokenizer import train_tokenizer

    texts = [s.text for s in default_world().sample(300, seed="test-widgets-dpo")]
    return train_tokenizer(texts, vocab_size=400, num_threads=1)


def dpo_policy(tok, seed=0):
    torch.manual_seed(seed)
    return LLM(LLMConfig(vocab_size=tok.vocab_size, context_size=256, dim_emb=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, ffd_hidden_dim=64))


def dpo_panel(tok, steps=8, **kw):
    "A DPO panel on happy-versus-sad story pairs from a random policy: a few seconds a run."
    preset = dataclasses.replace(TINY_DPO, steps=steps)
    pairs, held = story_preference_pairs(24, seed=0), story_preference_pairs(8, seed=1)
    return DPOPanel(dpo_policy(tok), tok, pairs, held, **{**dict(preset=preset, max_new_tokens=12), **kw})


def test_every_post_training_panel_is_a_policy_panel_and_copies_nothing():
    assert issubclass(PolicyPanel, RunPanel)
    for cls in (PPOPanel, GRPOPanel):
        assert issubclass(cls, RewardPanel)
    for cls in (PPOPanel, DPOPanel, GRPOPanel):
        assert issubclass(cls, PolicyPanel)
        for name in ("_train", "_on_stats", "_ended", "figure", "_problem", "_prepare", "_setup",
                     "_make_fields", "_config", "_models"):
            assert name not in vars(cls), (cls.__name__, name)  # shared, not copied


def test_dpo_fields_start_from_the_preset_and_the_policy_device(story_tok):
    panel = dpo_panel(story_tok, steps=7)
    assert list(panel.fields) == list(DPO_FIELDS)
    assert panel.values() == dict(beta=0.1, lr=3e-3, steps=7, batch_size=8, device="cpu")
    assert panel.thread is None and not panel.running and panel.stop_button.disabled
    assert "8 pairs per step" in panel.summary_text and "24 pairs" in panel.summary_text
    assert "8 held-out pairs" in panel.summary_text


@pytest.mark.slow
def test_dpo_start_runs_dpo_the_loss_falls_and_the_held_out_accuracy_rises(story_tok):
    panel = dpo_panel(story_tok, steps=8)
    start = dpo_policy(story_tok)
    panel.start()
    assert panel.running and panel.start_button.disabled and not panel.stop_button.disabled
    result = panel.wait(timeout=180)
    assert result is not None and panel.error is None, panel.message_text
    assert result.steps_done == 8 and not result.stopped_early and len(panel.history) == 8
    h = panel.history
    assert abs(h[0]["loss"] - math.log(2)) < 1e-4  # π = π_ref at the first step
    assert h[-1]["loss"] < 0.5 * h[0]["loss"], [s["loss"] for s in h]
    assert [s["step"] for s in h if "eval/accuracy" in s] == [1, 3, 5, 7]  # every eval_every=2 steps
    assert h[-1]["eval/accuracy"] > 0.5 and h[-1]["rewards/margins"] > 0
    assert all(math.isfinite(s["kl"]) for s in h if "kl" in s)  # k1 from 8 replies: noisy, can be < 0
    assert panel.progress.value == 8 and "step 8/8" in panel.status.value and "held-out accuracy" in panel.status.value
    assert panel.plot.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(panel.samples) == 3 and all(isinstance(s, str) for s in panel.samples)
    assert "Samples" in panel.samples_view.value and "→" in panel.samples_view.value
    assert panel.message_kind == "ok" and "Finished 8 steps" in panel.message_text
    assert "loss" in panel.message_text and "held-out accuracy" in panel.message_text
    assert panel.policy is panel.trainer.policy and panel.trainer.history == panel.history
    assert isinstance(panel.trainer, DPOTrainer)  # chapter 13's trainer drives the panel
    assert state_dicts_equal(panel.start_policy, start)  # the policy given is left as it was
    assert not state_dicts_equal(panel.policy, start)


def stop_after_three_steps(panel, timeout=60.0):
    "Start a long run, press Stop after three steps; check it ended cleanly there."
    panel.start()
    wait_until(lambda: len(panel.history) >= 3 or not panel.running, timeout=timeout)
    assert panel.running, panel.message_text
    panel.stop()
    result = panel.wait(timeout=60)
    assert not panel.running and panel.error is None, panel.message_text
    assert result.stopped_early and 3 <= result.steps_done < 100_000
    assert result.steps_done == len(panel.history) == panel.trainer.n_steps
    return result


@pytest.mark.slow
def test_dpo_stop_ends_cleanly_and_keeps_the_policy_it_reached(story_tok):
    panel = dpo_panel(story_tok, steps=100_000)
    stop_after_three_steps(panel, timeout=120)
    assert "Stopped at step" in panel.message_text and panel.message_kind == "ok"
    assert not state_dicts_equal(panel.policy, panel.start_policy)  # the policy DPO reached is kept
    assert state_dicts_equal(panel.start_policy, dpo_policy(story_tok))


@pytest.mark.parametrize("bad, word", [(dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"), (dict(lr=0.0), "lr"),
                                       (dict(steps=0), "steps"), (dict(batch_size=0), "batch_size")])
def test_dpo_bad_fields_give_a_message_and_start_nothing(story_tok, bad, word):
    panel = dpo_panel(story_tok).set(**bad)
    assert word in panel.summary_text
    panel.start()
    assert panel.thread is None and panel.trainer is None and not panel.running
    assert word in panel.message_text and panel.message_kind == "error"
    with pytest.raises(ValueError, match=word):
        dpo_preset_from_fields({**panel.values(), **bad}, TINY_DPO)


def test_dpo_panel_rejects_bad_arguments(story_tok):
    pairs = story_preference_pairs(4, seed=0)
    policy = dpo_policy(story_tok)
    with pytest.raises(ValueError, match="policy must be an LLM"):
        DPOPanel("model", story_tok, pairs, pairs)
    with pytest.raises(ValueError, match="ref_policy must be an LLM"):
        DPOPanel(policy, story_tok, pairs, pairs, ref_policy="sft")
    with pytest.raises(ValueError, match="tokenizer must be"):
        DPOPanel(policy, None, pairs, pairs)
    with pytest.raises(ValueError, match="empty"):
        DPOPanel(policy, story_tok, [], pairs)
    with pytest.raises(ValueError, match="PreferencePair"):
        DPOPanel(policy, story_tok, pairs, [("a", "b", "c")])
    with pytest.raises(ValueError, match="config must be a DPOPreset"):
        DPOPanel(policy, story_tok, pairs, pairs, preset=dict(beta=0.1))
    assert isinstance(pairs[0], PreferencePair)


@pytest.mark.slow
def test_dpo_error_in_the_thread_is_a_message(story_tok, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the reference is on another device")

    monkeypatch.setattr(DPOTrainer, "step", broken)  # chapter 13's step, in the thread
    panel = dpo_panel(story_tok)
    panel.start()
    assert panel.wait(timeout=60) is None
    assert isinstance(panel.error, RuntimeError) and "another device" in panel.message_text
    assert not panel.start_button.disabled and panel.stop_button.disabled


FIVE_G = GRPOConfig(num_generations=4, mini_batch_size=16, lr=1e-2, max_new_tokens=4)


def grpo_panel(steps=8, reward_fn=five_reward, **kw):
    "A GRPO panel on the tiny task of the PPO panel: 4 prompts × G = 4 responses a step."
    decode = lambda ids: " ".join(map(str, ids))
    kw = {**dict(config=FIVE_G, steps=steps, batch_size=4), **kw}
    return GRPOPanel(tiny_policy(), reward_fn, TINY_PROMPTS, decode, **kw)


def test_grpo_fields_start_from_the_config_and_the_policy_device():
    panel = grpo_panel(steps=7)
    assert list(panel.fields) == list(GRPO_FIELDS)
    assert panel.values() == dict(num_generations=4, beta=FIVE_G.beta, temperature=1.0, lr=1e-2, steps=7,
                                  batch_size=4, device="cpu")
    assert "16 responses (4 prompts × G = 4)" in panel.summary_text and "112 responses in all" in panel.summary_text
    assert panel.fields["num_generations"].description == "group size G"


@pytest.mark.slow
def test_grpo_start_runs_grpo_and_the_reward_rises():
    panel = grpo_panel(steps=12)
    panel.start()
    result = panel.wait(timeout=120)
    assert result is not None and panel.error is None, panel.message_text
    assert result.steps_done == 12 and not result.stopped_early and len(panel.history) == 12
    keys = ("reward", "kl_response", "approx_kl", "clip_ratio/region_mean", "frac_reward_zero_std")
    assert all(math.isfinite(s[k]) for s in panel.history for k in keys)
    rewards = [s["reward"] for s in panel.history]
    assert sum(rewards[-3:]) > sum(rewards[:3]), rewards  # GRPO finds the rewarded token
    assert panel.history[-1]["kl_response"] > 0
    assert panel.trainer.last_rollout.response_ids.shape[0] == 16  # 4 prompts × G = 4
    assert "step 12/12" in panel.status.value and "equal-reward groups" in panel.status.value
    assert panel.plot.value[:8] == b"\x89PNG\r\n\x1a\n" and len(panel.samples) == 3
    assert panel.message_kind == "ok" and "Finished 12 steps" in panel.message_text and "reward" in panel.message_text
    assert state_dicts_equal(panel.start_policy, tiny_policy())


@pytest.mark.slow
def test_grpo_equal_rewards_are_counted_and_teach_nothing():
    panel = grpo_panel(steps=3, reward_fn=lambda p, r: torch.ones(r.shape[0]))
    panel.start()
    assert panel.wait(timeout=60).steps_done == 3, panel.message_text
    assert all(s["frac_reward_zero_std"] == 1.0 for s in panel.history)
    assert "equal-reward groups 100%" in panel.status.value


@pytest.mark.slow
def test_grpo_stop_ends_cleanly_and_keeps_the_policy_it_reached():
    panel = grpo_panel(steps=100_000)
    stop_after_three_steps(panel)
    assert not state_dicts_equal(panel.policy, panel.start_policy)
    assert state_dicts_equal(panel.start_policy, tiny_policy())


@pytest.mark.parametrize("bad, word", [(dict(num_generations=1), "num_generations"), (dict(beta=-0.1), "beta"),
                                       (dict(temperature=0.0), "temperature"), (dict(batch_size=0), "batch_size"),
                                       (dict(steps=0), "steps")])
def test_grpo_bad_fields_give_a_message_and_start_nothing(bad, word):
    panel = grpo_panel().set(**bad)
    assert word in panel.summary_text
    panel.start()
    assert panel.thread is None and panel.trainer is None and not panel.running
    assert word in panel.message_text and panel.message_kind == "error"
    with pytest.raises(ValueError, match=word):
        grpo_config_from_fields({**panel.values(), **bad}, FIVE_G)


def test_grpo_panel_rejects_bad_arguments():
    with pytest.raises(ValueError, match="policy must be an LLM"):
        GRPOPanel("model", five_reward, TINY_PROMPTS, str)
    with pytest.raises(ValueError, match="reward_fn must be a function"):
        GRPOPanel(tiny_policy(), None, TINY_PROMPTS, str)
    with pytest.raises(ValueError, match="prompts must be"):
        GRPOPanel(tiny_policy(), five_reward, [], str)
    with pytest.raises(ValueError, match="decode must be a function"):
        GRPOPanel(tiny_policy(), five_reward, TINY_PROMPTS, "decode")
    with pytest.raises(ValueError, match="config must be a GRPOConfig"):
        GRPOPanel(tiny_policy(), five_reward, TINY_PROMPTS, str, config=TINY_PPO)


def test_figures_draw_every_statistic_and_held_out_ones_as_dots(story_tok):
    import matplotlib
    matplotlib.use("Agg")
    hist = [dict(step=i, loss=1.0 / (i + 1), **({"eval/accuracy": 0.5 + i / 20} if i % 2 else {}))
            for i in range(6)]
    panel = dpo_panel(story_tok)
    panel.history = hist
    axes = panel.figure()
    assert len(axes) == len(DPOPanel.stats) == 4
    loss_line, acc_line = axes[0].lines[0], axes[1].lines[0]
    assert list(loss_line.get_xdata()) == [1, 2, 3, 4, 5, 6] and loss_line.get_marker() in (None, "None")
    assert list(acc_line.get_xdata()) == [2, 4, 6] and acc_line.get_marker() == "o"  # only the checked steps
    assert len(grpo_panel().figure()) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dpo_and_grpo_panels_train_on_cuda(story_tok):
    for panel in (dpo_panel(story_tok, steps=3), grpo_panel(steps=3)):
        panel.set(device="cuda").start()
        assert panel.wait(timeout=180).steps_done == 3, panel.message_text
        assert panel.policy.embed_tokens.weight.device.type == "cuda"
        assert panel.start_policy.embed_tokens.weight.device.type == "cpu"


@pytest.mark.slow
def test_grpo_fields_reach_the_trainer():
    panel = grpo_panel(steps=1).set(num_generations=2, batch_size=3, beta=0.2, temperature=0.7)
    assert "6 responses (3 prompts × G = 2)" in panel.summary_text
    panel.start()
    assert panel.wait(timeout=60).steps_done == 1, panel.message_text
    c = panel.trainer.config
    assert (c.num_generations, c.beta, c.temperature, c.lr) == (2, 0.2, 0.7, FIVE_G.lr)
    assert panel.trainer.last_rollout.response_ids.shape[0] == 6  # 3 prompts × G = 2
    assert panel.base_config == FIVE_G  # the config given is left as it was
