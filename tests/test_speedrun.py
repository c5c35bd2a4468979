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
from tinyllama.train import pretrain_preset


class _Stop(Exception):
    "Raised by a stand-in recipe once it has seen its arguments."


def test_the_cpu_pretraining_preset_is_the_one_the_speedrun_measured():
    # 1,000 steps of 16: the run behind bench/results/2026-12-04-speedrun-cpu-seed*.md
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
    assert note.startswith("before → after PPO; 200 test words")
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
