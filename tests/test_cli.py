"""The `tinyllama` command (tinyllama.cli): subcommands, the speedrun report, and its errors.

Runs use the ci profile with a handful of steps, so the whole file takes seconds."""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
from tinyllama.cli import main  # noqa: E402
from tinyllama.speedrun import (Metric, Section, Speedrun, matmul_params, model_flops_per_token,  # noqa: E402
                           metrics_table, run_speedrun)
from tinyllama.model import LLM, LLMConfig  # noqa: E402
from tinyllama.train import pretrain_preset, steps_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    "A checkpoint folder written by `tinyllama pretrain` (ci profile, 4 steps)."
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    assert main(["pretrain", "--profile", "ci", "--steps", "4", "--out", str(out), "--no-progress"]) == 0
    return out


def _exit_code_and_stderr(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_writes_a_loadable_checkpoint(checkpoint):
    from tinyllama.checkpoint import load_checkpoint
    for name in ("model.safetensors", "config.json", "trainer_state.pt", "tokenizer.model", "metrics.jsonl"):
        assert (checkpoint / name).is_file(), name
    model, state = load_checkpoint(checkpoint)
    assert state["step"] == 4
    assert model.config.dim_emb == pretrain_preset("ci").model["dim_emb"]


@pytest.mark.slow
def test_sample_prints_the_prompt_and_a_continuation(checkpoint, capsys, tmp_path):
    assert main(["sample", str(checkpoint), "--profile", "ci", "--max-new-tokens", "8", "--prompt", "Once upon a time,",
                 "--prompt", "Tom", "--top-k", "20", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Once upon a time," in out and "Tom" in out
    written = (tmp_path / "samples.md").read_text()
    assert "**Once upon a time,**" in written and "**Tom**" in written
    # each continuation adds text after its prompt
    for line in written.strip().split("\n\n"):
        assert len(line.split("**")[-1].strip()) > 0, line


@pytest.mark.slow
def test_sample_is_reproducible_with_a_seed(checkpoint, capsys):
    argv = ["sample", str(checkpoint), "--profile", "ci", "--max-new-tokens", "10", "--prompt", "One day", "--seed", "3"]
    main(argv)
    first = capsys.readouterr().out
    main(argv)
    assert capsys.readouterr().out == first


@pytest.mark.slow
def test_speedrun_writes_report_with_table_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["speedrun", "--profile", "ci", "--steps", "6", "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    for row in ("| held-out NLL per story |", "| entropy floor per story |", "| NLL / floor |",
                "| training tokens/s |", "| MFU |", "| wall time |", "| valid stories |",
                "| SFT exact match |", "| SFT instruction following |", "| PPO exact copies |",
                "| PPO correct tokens per word |", "| PPO reward per response |", "| PPO final KL |",
                "| reward model pair accuracy |", "| labeler prefers PPO over SFT |", "| KL to the SFT policy |",
                "| labeler's mean score |", "| DPO implicit-reward accuracy |",
                "| labeler prefers DPO over SFT |", "| DPO KL to the SFT policy |"):
        assert row in report, row
    for plot in ("loss", "sft", "ppo", "feedback", "dpo"):
        assert f"![{plot}]({plot}.png)" in report
        assert (out / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint" / "model.safetensors").is_file() and (out / "samples.md").is_file()
    for title in ("Pretraining", "Samples", "Supervised fine-tuning", "PPO on the copy task",
                  "Human feedback (scripted labeler)", "DPO (the same labels)"):
        assert f"## {title}\n\n*wall time " in report, title  # every stage's wall time
    # the ratio in the table is NLL / floor of the two rows above it
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in report.splitlines() if line.startswith("| ")}
    nll, floor = float(rows["held-out NLL per story"].split()[0]), float(rows["entropy floor per story"].split()[0])
    assert float(rows["NLL / floor"]) == pytest.approx(nll / floor, rel=1e-3)
    assert 0 < float(rows["MFU"].rstrip("%")) < 100
    # before → after figures are percentages / token counts in range
    for name in ("SFT exact match", "SFT instruction following", "PPO exact copies"):
        before, after = (float(v.rstrip("%")) for v in rows[name].split(" → "))
        assert 0 <= before <= 100 and 0 <= after <= 100, name
    assert 0 <= float(rows["labeler prefers PPO over SFT"].rstrip("%")) <= 100
    assert 0 <= float(rows["reward model pair accuracy"].rstrip("%")) <= 100
    assert math.isfinite(float(rows["KL to the SFT policy"].split()[0]))  # a sample estimate: only its mean is >= 0
    labels = [json.loads(l) for l in (out / "labels.jsonl").read_text().splitlines()]
    assert labels and all(l["labeler"] == "scripted:happy-ending" and l["model_id"] == "sft" for l in labels)
    assert 0 <= float(rows["labeler prefers PPO over SFT"].rstrip("%")) <= 100
    assert 0 <= float(rows["reward model pair accuracy"].rstrip("%")) <= 100
    assert math.isfinite(float(rows["KL to the SFT policy"].split()[0]))  # a sample estimate: only its mean is >= 0
    labels = [json.loads(l) for l in (out / "labels.jsonl").read_text().splitlines()]
    assert labels and all(l["labeler"] == "scripted:happy-ending" and l["model_id"] == "sft" for l in labels)
    before, after = (float(v) for v in rows["PPO correct tokens per word"].split(" → "))
    assert 0 <= before < after <= 5  # PPO from random weights copies more letters (at most 4 and EOS)
    printed = capsys.readouterr().out
    assert "| NLL / floor |" in printed  # the table is also printed
    assert f"tinyllama chat --checkpoint {out / 'sft'}" in printed
    # the SFT stage's checkpoint is one `tinyllama chat` can load and answer with
    assert main(["chat", "--checkpoint", str(out / "sft"), "--message", "Who is the hero of the story?",
                 "--max-new-tokens", "8"]) == 0
    chat = capsys.readouterr()
    assert chat.out.endswith("\n") and "note:" not in chat.err and "Traceback" not in chat.err
    # a second speedrun into the same folder is refused rather than overwriting the report
    code, err = _exit_code_and_stderr(["speedrun", "--profile", "ci", "--out", str(out)], capsys)
    assert code == 2 and str(out) in err


@pytest.mark.slow
def test_speedrun_runs_the_stages_asked_for(tmp_path, capsys):
    "--stages ppo runs the copy task alone: no pretraining, only PPO's rows and plot."
    out = tmp_path / "ppo-only"
    assert main(["speedrun", "--profile", "ci", "--stages", "ppo", "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert "| PPO exact copies |" in report and "--stages ppo" in report
    assert "| NLL / floor |" not in report and "## Pretraining" not in report and not (out / "checkpoint").exists()
    assert (out / "ppo.png").is_file()


@pytest.mark.slow
def test_speedrun_grpo_stage_reports_the_copy_task(tmp_path):
    "--stages grpo: chapter 14's GRPO on the PPO stage's copy task, with its own rows."
    out = tmp_path / "grpo-only"
    assert main(["speedrun", "--profile", "ci", "--stages", "grpo", "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    for row in ("| GRPO exact copies |", "| GRPO sampled tokens |", "| GRPO training time |"):
        assert row in report, row
    assert "## GRPO on the copy task" in report and "| PPO exact copies |" not in report
    assert "process supervision" in report and "% of " in report  # count and interval


@pytest.mark.parametrize("stages, words", [
    ("pretrain,sfft", "'sfft'"),
    ("sft", "needs 'pretrain'"),
    ("samples,ppo", "--stages pretrain,samples,ppo"),
    ("feedback", "needs 'pretrain' and 'sft'"),
    ("pretrain,feedback", "--stages pretrain,sft,feedback"),
    ("feedback", "needs 'pretrain' and 'sft'"),
    ("pretrain,feedback", "--stages pretrain,sft,feedback"),
    (" , ", "empty"),
])
def test_bad_stages_fail_before_anything_runs(stages, words, tmp_path, capsys):
    out = tmp_path / "never"
    code, err = _exit_code_and_stderr(["speedrun", "--profile", "ci", "--stages", stages, "--out", str(out)], capsys)
    assert code == 2 and words in err and "Traceback" not in err
    assert "pretrain,samples,sft,ppo,feedback" in err or "needs" in err
    assert not out.exists()


def test_parse_stages_keeps_pipeline_order():
    from tinyllama.speedrun import parse_stages, SPEEDRUN_STAGES
    assert [n for n, _ in SPEEDRUN_STAGES] == ["pretrain", "samples", "sft", "ppo", "feedback", "dpo", "grpo"]
    assert [n for n, _ in parse_stages(None)] == ["pretrain", "samples", "sft", "ppo", "feedback", "dpo"]  # grpo: opt-in
    assert [n for n, _ in parse_stages("grpo,ppo")] == ["ppo", "grpo"]
    assert [n for n, _ in parse_stages("PPO, sft,pretrain")] == ["pretrain", "sft", "ppo"]


def test_speedrun_stages_extend_the_report(tmp_path):
    "A later chapter adds a stage: a function returning a Section; its rows join the table."
    def fake_stage(run):
        run.state["seen"] = True
        return Section("Fine-tuning", "it ran", [Metric("answer accuracy", "0.97", "made up for the test")])
    run = Speedrun("ci", tmp_path / "r", progress=False)
    report = run_speedrun(run, stages=[("first", fake_stage), ("second", lambda r: Section("Second", "more"))])
    text = report.read_text()
    assert run.state["seen"] and "| answer accuracy | 0.97 |" in text
    assert text.index("## Fine-tuning") < text.index("## Second")
    assert "| wall time |" in metrics_table(run)


@pytest.mark.parametrize("argv, words", [
    (["pretrain", "--steps", "0"], "--steps"),
    (["pretrain", "--steps", "ten"], "whole number"),
    (["sample", "x", "--top-p", "1.5"], "(0, 1]"),
    (["sample", "x", "--temperature", "-1"], ">= 0"),
    (["sample", "x", "--top-k", "0"], "--top-k"),
    (["speedrun", "--profile", "tpu"], "invalid choice"),
    (["sample"], "checkpoint"),
    ([], "required"),
    (["fly"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_a_message(argv, words, capsys):
    code, err = _exit_code_and_stderr(argv, capsys)
    assert code == 2
    assert words in err and "Traceback" not in err


def test_missing_checkpoint_is_one_line_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, err = _exit_code_and_stderr(["sample", str(missing)], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and str(missing) in err and "Traceback" not in err


@pytest.mark.slow
def test_folder_without_tokenizer_or_with_damaged_weights(checkpoint, tmp_path, capsys):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "tokenizer.model").unlink()
    code, err = _exit_code_and_stderr(["sample", str(broken)], capsys)
    assert code == 2 and "tokenizer.model" in err
    shutil.copy(checkpoint / "tokenizer.model", broken / "tokenizer.model")
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])  # truncated
    code, err = _exit_code_and_stderr(["sample", str(broken)], capsys)
    assert code == 2 and "model.safetensors" in err and "Traceback" not in err


@pytest.mark.slow
def test_pretrain_refuses_to_overwrite_and_resume_needs_a_checkpoint(checkpoint, tmp_path, capsys):
    code, err = _exit_code_and_stderr(["pretrain", "--profile", "ci", "--out", str(checkpoint)], capsys)
    assert code == 2 and "--resume" in err
    code, err = _exit_code_and_stderr(["pretrain", "--profile", "ci", "--resume", "--out", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no checkpoint" in err


def test_steps_override_keeps_the_config_valid():
    "--steps below the preset's warmup shrinks the warmup and eval interval with it."
    preset = pretrain_preset("cpu")
    for steps in (1, 5, 50, preset.train.steps, 10 * preset.train.steps):
        o = steps_overrides(preset.train, steps)
        assert o["steps"] == steps and 0 <= o["warmup_steps"] <= steps and o["eval_every"] <= max(steps, 1)
    assert steps_overrides(preset.train, None) == {}


@pytest.mark.parametrize("shape", [
    dict(vocab_size=4096, context_size=256, dim_emb=288, num_layers=6, num_heads=6, num_kv_heads=2, ffd_hidden_dim=768),
    dict(vocab_size=100, context_size=32, dim_emb=32, num_layers=1, num_heads=4, num_kv_heads=1, ffd_hidden_dim=40,
         tie_embeddings=True),
])
def test_flops_count_the_models_matmul_weights(shape):
    cfg = LLMConfig(**shape)
    with torch.device("meta"):
        model = LLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(cfg) == linear
    assert model_flops_per_token(cfg) == 6 * linear + 12 * cfg.num_layers * cfg.context_size * cfg.dim_emb
    assert model_flops_per_token(cfg, context=8) < model_flops_per_token(cfg)


def test_console_script_points_at_main():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tinyllama"] == "tinyllama.cli:main"
