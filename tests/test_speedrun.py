"""The speedrun's own presets (issue 10): `tinyllama speedrun --profile cpu` runs whatever seed a
reader gives it, so its presets were chosen to land every measured seed in the report's bands
(pretraining: chapter 07's own cpu preset; PPO: a shorter speedrun variant). The measurements
are in appendix E, nbs/94_speedrun.ipynb.

These tests check the presets and that the stages use them with the run's seed; nothing trains.
"""

import importlib

import pytest

from tinyllama import speedrun
from tinyllama.ppo import ppo_preset
from tinyllama.sft import wilson_interval
from tinyllama.train import pretrain_preset


class _Stop(Exception):
    "Raised by a stand-in recipe once it has seen its arguments."


def test_the_cpu_pretraining_preset_is_the_one_the_speedrun_measured():
    # 1,000 steps of 16: the run behind bench/results/2026-12-05-speedrun-cpu-seed*.md
    # (seeds 0-3 at 1.004-1.016 x the floor; 500 steps of 32 left seed 2 at 1.178)
    from tinyllama.profiles import preset_digest

    pre = pretrain_preset("cpu")
    t = pre.train
    assert (t.steps, t.batch_size, t.warmup_steps) == (1000, 16, 100)
    assert (t.eval_every, t.eval_batches) == (100, 16)
    assert (t.lr, t.min_lr) == (3e-3, 1e-4)
    assert pre.band == (1.0, 1.08)
    assert preset_digest(pre) == "74a6e491eec0"  # the speedrun reports' preset


def test_the_pretraining_stage_uses_chapter_07_s_preset_and_the_run_s_seed(tmp_path, monkeypatch):
    train = importlib.import_module("tinyllama.train")  # the module, not the function

    seen = {}

    def fake_pretrain(preset, out_dir=None, progress=True, seed=0, **overrides):
        seen.update(preset=preset, seed=seed, overrides=overrides)
        raise _Stop

    monkeypatch.setattr(train, "pretrain", fake_pretrain)
    monkeypatch.setattr(train, "set_cpu_threads", lambda n, device: 1)
    monkeypatch.setattr(speedrun, "matmul_peak_flops", lambda *a, **k: 1e9)
    run = speedrun.Speedrun("cpu", tmp_path, seed=2, device="cpu", progress=False)
    with pytest.raises(_Stop):
        speedrun.stage_pretrain(run)
    assert seen["preset"] == pretrain_preset("cpu")
    assert seen["preset"].train.batch_size == 16 and seen["seed"] == 2


def test_the_speedrun_s_ppo_preset_takes_chapter_11_s_batch():
    small, full = ppo_preset("cpu", speedrun=True), ppo_preset("cpu")
    assert (small.batch_size, small.mini_batch_size) == (full.batch_size, full.mini_batch_size) == (128, 64)
    assert small.alphabet == "abcdefghijkl" and small.max_len == 5
    assert (small.max_steps, small.lr, small.eval_every) == (300, 1e-3, 10)
    assert small.max_steps < full.max_steps and small.dim_emb == full.dim_emb


def test_the_ppo_stage_uses_the_speedrun_preset_and_the_run_s_seed(tmp_path, monkeypatch):
    ppo = importlib.import_module("tinyllama.ppo")

    seen = {}

    def fake_run(preset, device=None, seed=0, progress=True, **kw):
        seen.update(preset=preset, seed=seed)
        raise _Stop

    monkeypatch.setattr(ppo, "run_copy_task", fake_run)
    run = speedrun.Speedrun("cpu", tmp_path, seed=3, device="cpu", progress=False)
    with pytest.raises(_Stop):
        speedrun.stage_ppo(run)
    assert seen["preset"] == ppo_preset("cpu", speedrun=True) and seen["seed"] == 3


@pytest.mark.parametrize(
    "exact, profile, verdict",
    [(1.0, "cpu", "inside"), (0.99, "cpu", "inside"), (0.645, "cpu", "OUTSIDE"), (0.5, "ci", None)],
)
def test_the_ppo_row_states_the_cpu_band(exact, profile, verdict):
    note = speedrun._ppo_exact_note(200, exact, profile)
    lo, hi = wilson_interval(round(exact * 200), 200)
    assert note.startswith(f"before → after PPO; after: 95% CI {lo:.1%}–{hi:.1%}; 200 test words")
    if verdict is None:
        assert "expected" not in note
    else:
        assert note.endswith(f"for the cpu profile: {verdict}")


@pytest.mark.parametrize("seed, shown", [(0, False), (2, True)])
def test_the_report_s_command_names_the_seed(tmp_path, seed, shown):
    "A report of seed 2 must give the command that reproduces seed 2."
    run = speedrun.Speedrun("cpu", tmp_path, seed=seed, stages="ppo", progress=False)
    line = next(s for s in speedrun.render_report(run).splitlines() if "Command:" in s)
    assert ("--seed 2 --stages ppo`" in line) == shown
    assert line.endswith("`tinyllama speedrun --profile cpu --stages ppo`.") != shown


# Every rate in the report's table carries its 95% interval (issue 12: "win rate with interval").
class _Fig:
    def savefig(self, path, dpi=None):
        pass


def _verdict_interval(rate, n):
    lo, hi = wilson_interval(round(rate * n), n)
    return f"95% CI {lo:.1%}–{hi:.1%}"


@pytest.mark.parametrize("rate, n", [(0.694, 400), (0.5, 10), (1.0, 200), (0.0, 50)])
def test_the_interval_is_wilson_s_with_ties_counting_half(rate, n):
    assert speedrun._interval(rate, n) == _verdict_interval(rate, n)


def _section_rows(tmp_path, monkeypatch, module, recipe, fake, section) -> dict:
    "A stage's rows (name -> note), its chapter's recipe replaced by one that returns `fake`."
    monkeypatch.setattr(importlib.import_module(module), recipe, lambda *a, **k: fake)
    run = speedrun.Speedrun("cpu", tmp_path, device="cpu", progress=False)
    run.state.update(model=object(), tokenizer=None)
    return {m.name: m.note for m in section(run, "cpu").metrics}


def test_the_feedback_rows_give_intervals(tmp_path, monkeypatch):
    from types import SimpleNamespace

    fake = SimpleNamespace(
        plot=_Fig(), history=[], verdict={"win_rate": 0.694, "n": 400}, rm_accuracy=0.869,
        scores_before=[0.0, 1.0], scores_after=[2.0, 3.0], n_val_pairs=267, n_train_pairs=267,
        kl_mean=2.55, prompts=["p"], before=["b"], after=["a"], summary=lambda: ["x"],
    )
    rows = _section_rows(
        tmp_path, monkeypatch, "tinyllama.feedback", "run_feedback_loop", fake, speedrun._feedback_section
    )
    assert rows["labeler prefers PPO over SFT"].startswith(_verdict_interval(0.694, 400) + "; 400 held-out")
    assert rows["reward model pair accuracy"].startswith(_verdict_interval(0.869, 267) + "; 267 held-out")


def test_the_dpo_rows_give_intervals(tmp_path, monkeypatch):
    from types import SimpleNamespace

    fake = SimpleNamespace(
        plot=_Fig(), history=[], verdict={"win_rate": 0.678, "n": 400}, accuracy=0.858,
        n_val_pairs=417, n_train_pairs=267, kl_mean=2.95, summary=lambda: ["x"],
    )
    rows = _section_rows(tmp_path, monkeypatch, "tinyllama.dpo", "run_dpo", fake, speedrun._dpo_section)
    assert rows["labeler prefers DPO over SFT"].startswith(_verdict_interval(0.678, 400) + "; 400 held-out")
    assert rows["DPO implicit-reward accuracy"].startswith(_verdict_interval(0.858, 417) + "; 417 held-out")


def test_the_sft_row_gives_the_interval_after_sft():
    from types import SimpleNamespace

    after = SimpleNamespace(accuracy=0.497, n=441)
    follow = SimpleNamespace(rate=0.312, n=16)
    sft = SimpleNamespace(
        before=None, after=after, follow_before=None, follow_after=follow,
        heldout=[SimpleNamespace(story=i % 60) for i in range(441)],
    )
    exact, follows = (m.note for m in speedrun._sft_metrics(sft))
    assert exact.startswith(f"before → after SFT; after: {_verdict_interval(0.497, 441)}; 441 questions")
    assert follows.startswith(f"before → after SFT; after: {_verdict_interval(0.312, 16)}; 16 held-out")


def test_the_grpo_row_gives_the_interval(tmp_path, monkeypatch):
    from types import SimpleNamespace

    fake = SimpleNamespace(
        words={"test": ["abc"] * 200}, before=SimpleNamespace(exact=0.0), after=SimpleNamespace(exact=0.965),
        history=[{}] * 300, checks=[], sampled_tokens=212303, seconds=55.0,
    )
    rows = _section_rows(
        tmp_path, monkeypatch, "tinyllama.grpo", "run_grpo_copy_task", fake, speedrun._grpo_section
    )
    assert rows["GRPO exact copies"].startswith(
        f"before → after GRPO; after: {_verdict_interval(0.965, 200)}; 200 test words never trained on"
    )
