"""Figures the prose quotes from a run come from the run (issue 10, "Never stale").

For every notebook in `nbs/`, each *quoted figure* in its markdown cells must be found
among the numbers of that notebook's committed outputs, or be declared in `DECLARED`
below with a reason. The notebooks stay as they are (no glue: Colab does not render it).

**A quoted figure** is a number in prose that looks measured:
- a decimal (`3.91`, `0.304`, `1.037`) or a percentage (`82.5%`, `77%`);
- an integer followed by a unit of time or of the course (`650 s`, `414 pairs`, `3 ×`;
  the list is `UNITS`; the unit may start the next line);
- an integer written with thousands separators (`1,241`), one counted against another
  (`151 of 200`), or one on either side of an arrow (`157 → 147`).

Not figures: numbers inside `code`, `$math$`, fenced code, link targets and HTML
tags; numbers glued to a word (`7B`, `2nd`, `d64`, `Llama-2`); numbers after a reference
word (`section 3.5`, `§4.1`, `arXiv:2305.07759`, `torch 2.5`, `capability 8.0`); a
parameter's setting (`β = 0.05`); a confidence level (`95% interval`); and hedged or
bounding numbers (`about 15 s`, `about 2–3 min`, `≈0.4%`, `at least 75%`, `below 15
nats`), which state no measurement.

**The run's numbers** are every number in the committed outputs: stream text, and the
`text/plain`, `text/markdown` and `text/html` (tags stripped) of results and displays.

**A figure matches an output number** `o` when, with `d` the decimals the prose writes,
- `o` equals it, or `o` has at least `d` decimals and rounds to it:
  |o − figure| ≤ ½·10⁻ᵈ (a tie may round either way): `3.9` matches `3.91`; `3.91`
  matches neither `3.9` nor `3.92`;
- a percentage matches a printed percentage, or a decimal as a share or as a percentage
  (`82.5%` matches `0.825` and `82.5`, `82%` matches `0.8246`), never a bare integer;
- thousands separators and the minus sign are only spelling: `13,173` is `13173`,
  `−0.61` is `-0.61`;
- a figure in minutes also matches seconds (`2.4 min` matches `144 s`, within ½·10⁻ᵈ
  min), and one with a scale letter the full count (`7.7 M` matches `7,712,345`).

**Declared figures** (`DECLARED[notebook][figure] = reason`) are not from the
notebook's run: papers, constants, settings, arithmetic, other runs. A reason
`from NN_name` (another notebook) or `from path/in/repo` (a committed file, e.g.
`bench/seed_bands.jsonl`) is *checked*: the figure must match that notebook's outputs,
or a number in that file. A key `"0.5 | slip"` covers only the occurrences whose
sentence contains `slip`. A declaration that no longer covers any figure fails, so the
list cannot rot.

`PENDING` names notebooks other helpers are re-running: they are checked and reported as
xfail (strict: a notebook that passes must leave the set); `--runxfail` prints their
mismatches.
"""

import functools
import html
import json
import pathlib
import re
from decimal import Decimal

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / "nbs").glob("[0-9]*.ipynb"))

UNITS = (
    r"tok/s|tokens?/s|GFLOP/s|TFLOP/s|GB/s|ms|µs|us|s|sec|seconds?|min|minutes?|h|hours?|"
    r"nats?|bits?|×|x|times|steps?|updates?|epochs?|pairs?|labels?|tokens?|stories|story|"
    r"samples?|requests?|questions?|answers?|words?|letters?|examples?|chats?|prompts?|"
    r"replies|reply|completions?|wins?|ties?|losses|points?|parameters?|params|layers?|"
    r"KiB|MiB|GiB|KB|MB|GB|TB|FLOPs?|MFU"
)
SCALES = {"k": 10**3, "K": 10**3, "M": 10**6, "B": 10**9}
_NUM = re.compile(
    r"(?<![\w.,/\-])([-−+]?)(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(\s?%)?"
)
_GAP = r"[^\S\n]*\n?[^\S\n]*"  # spaces, or a line break: "1,212\n  parameters"
_UNIT = re.compile(_GAP + r"(" + UNITS + r")(?![\w/])")
_SCALE = re.compile(_GAP + r"([kKMB])(?![a-zA-Z])")
_REFERENCE = re.compile(
    r"(?<![a-z])(?:sections?|§|arxiv:|eq\.|equation|fig\.|figure|table|version|v|"
    r"torch|python|cuda|capability|llama|gpt)\s*(?:[<>≥≤]=?\s*)?$",
    re.I,
)
_HEDGE = re.compile(
    r"(?<![a-z])"
    r"(?:about|roughly|around|near|nearly|almost|approximately|some|~|≈|under|over|below|"
    r"above|beyond|at least|at most|up to|more than|less than|fewer than|within|"
    r"≥|≤|<|>)\s*(?:\d[\d.,]*\s*(?:–|-|to)\s*)?$",  # also the far end: "about 2–3 min"
    re.I,
)
_COUNT = re.compile(
    r"\s+(?:of|out of)\s+(?:the\s+|its\s+)?\d|\s*→"
)  # "151 of 200", "1 → 2"
_ARROW = re.compile(r"→\s*$")
_SETTING = re.compile(r"[α-ωΑ-Ω]\s*=\s*$")  # a parameter set to a value: "β = 0.05"
_LEVEL = re.compile(r"\s*(?:\(\w+\)\s*)?(?:confidence|interval|CI\b|Wilson)", re.I)
_MASKS = [
    re.compile(r"```.*?```", re.S),
    re.compile(r"\$\$.*?\$\$", re.S),
    re.compile(r"(?<![\\$])\$(?!\$).*?(?<!\\)\$", re.S),
    re.compile(r"`[^`\n]*`"),
    re.compile(r"(?<=\])\([^)\s]*\)"),  # link targets
    re.compile(r"<[^>\n]*>"),  # html tags
    re.compile(r"https?://\S+"),
]


def _mask(text: str) -> str:
    "The prose with code, math, link targets and tags blanked out (same length)."
    for pat in _MASKS:
        text = pat.sub(lambda m: re.sub(r"\S", " ", m.group(0)), text)
    return text


class Figure:
    "A number as written: its value, the decimals it shows, and whether it is a %."

    def __init__(self, text: str, unit: str = "", scale: str = ""):
        self.text, self.unit, self.scale = text, unit, scale
        s = text.replace("−", "-").replace(",", "").replace("%", "").strip()
        self.percent = text.rstrip().endswith("%")
        mant, _, exp = s.lower().partition("e")
        self.decimals = len(mant.split(".")[1]) if "." in mant else 0
        if exp:
            self.decimals = max(0, self.decimals - int(exp))
        self.value = Decimal(s)

    def __str__(self):
        return " ".join(filter(None, (self.text, self.scale or self.unit)))


def sentence(text: str, start: int, end: int) -> str:
    "The sentence (or table row) of `text` around text[start:end], on one line."
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end
    if text[line_start:line_end].lstrip().startswith("|"):
        lo, hi = line_start, line_end
    else:
        para = max(text.rfind("\n\n", 0, start), text.rfind("\n- ", 0, start))
        stops = [m.end() for m in re.finditer(r"[.!?;](?=\s)", text[:start])]
        lo = max([para + 1] + [s for s in stops])
        after = re.search(r"[.!?;](?=\s|$)|\n\n|\n- ", text[end:])
        hi = end + after.end() if after else len(text)
    return " ".join(text[lo:hi].split())


def quoted_figures(text: str):
    "(Figure, sentence) for each quoted figure in a markdown cell's text."
    for fig, where, _ in _figures(text):
        yield fig, where


def _figures(text: str):
    "(Figure, sentence, span of the number in `text`) for each quoted figure."
    masked = _mask(text)
    for m in _NUM.finditer(masked):
        sign, num, pct = m.groups()
        before, after = masked[max(0, m.start() - 20) : m.start()], masked[m.end() :]
        unit = None if pct else _UNIT.match(after)
        scale = None if pct or unit else _SCALE.match(after)
        if not (pct or unit or scale) and re.match(r"[A-Za-z_\d]", after):
            continue  # glued to a word: 7B, 2nd, 3D
        if (
            _REFERENCE.search(before)
            or _HEDGE.search(before)
            or _SETTING.search(before)
        ):
            continue
        if pct and _LEVEL.match(after):
            continue  # a confidence level: "95% interval"
        counted = "," in num or _COUNT.match(after) or _ARROW.search(before)
        if not ("." in num or pct or unit or counted):
            continue
        fig = Figure(
            sign.replace("+", "") + num + ("%" if pct else ""),
            unit.group(1) if unit else "",
            scale.group(1) if scale else "",
        )
        yield fig, sentence(text, m.start(), m.end()), m.span()


_ONUM = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?%?"
)


def numbers_in(text: str) -> list[Figure]:
    "Every number in a run's text, as written."
    text = text.replace("−", "-")
    return [Figure(m.group(0)) for m in _ONUM.finditer(text)]


def output_text(nb: dict) -> str:
    "The committed outputs' text: streams, plain, markdown and html (tags stripped)."
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append("".join(out["text"]))
                continue
            data = out.get("data", {})
            for kind in ("text/plain", "text/markdown", "text/html"):
                if kind in data:
                    value = "".join(data[kind])
                    if kind == "text/html":
                        value = html.unescape(re.sub(r"<[^>]+>", " ", value))
                    parts.append(value)
    return "\n".join(parts)


def _forms(fig: Figure):
    "(value, tolerance, needs-decimals) targets a quoted figure may be printed as."
    tol = Decimal(5) * Decimal(10) ** (-fig.decimals - 1)
    yield fig.value, tol, True
    if fig.unit in ("min", "minute", "minutes"):
        yield fig.value * 60, tol * 60, False
    if fig.scale:
        yield fig.value * SCALES[fig.scale], tol * SCALES[fig.scale], False


def matches(fig: Figure, run: list[Figure]) -> bool:
    "Whether `fig` is one of the run's numbers, as printed or rounded (see the top)."
    targets = list(_forms(fig))
    for o in run:
        printed = [(o.value, o.decimals)]
        if fig.percent and not o.percent:
            if not o.decimals:
                continue  # a bare integer is no share: "64%" is not the "64" of "64/8"
            printed.append((o.value * 100, max(0, o.decimals - 2)))
        for value, decimals in printed:
            for target, tol, needs_decimals in targets:
                if value == target:
                    return True
                if abs(value - target) <= tol and (
                    decimals >= fig.decimals or not needs_decimals
                ):
                    return True
    return False


@functools.cache
def notebook(stem: str) -> dict:
    return json.loads((ROOT / "nbs" / f"{stem}.ipynb").read_text())


@functools.cache
def run_numbers(stem: str) -> list[Figure]:
    return numbers_in(output_text(notebook(stem)))


@functools.cache
def file_numbers(rel: str) -> list[Figure]:
    return numbers_in((ROOT / rel).read_text())


def prose(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]


# Figures that are not from the notebook's own run, and why. "from X" is checked.
# "uncommitted run:" marks a measurement the sentence itself places outside the
# committed run (another machine, an earlier version): nothing in the repo holds it.
RMSNORM_PAPER = "the RMSNorm paper's speed-ups (Zhang & Sennrich, 2019)"
LLAMA2 = "Llama 2's published configs (Touvron et al., 2023): arithmetic"
README = "from README.md: the speedrun measured there"
SEEDS = "from bench/seed_bands.jsonl: scripts/seed_bands.py's runs"
STAGE_TRIAL = "uncommitted run: a trial of the feedback stage's preset (one SFT model)"
SPEEDRUN_SFT = "from tinyllama/sft.py: the speedrun's SFT preset (a setting)"
SPEEDRUN_PPO = "from tinyllama/ppo.py: the speedrun's PPO preset (a setting)"
PRESET_TRIALS = "from bench/results/2026-12-04-speedrun-presets.jsonl: the speedrun's preset trials"
FEEDBACK = "from tinyllama/feedback.py: chapter 12's cpu preset (a setting)"
OLD_09 = "uncommitted run: chapter 09's run before the shared base model (issue 10)"
DECODE_CPU = "from bench/results/2026-12-04-decode-course-cpu.txt: the course-cpu run"
DECODE_DEFAULT = "from bench/results/2026-12-04-decode-stories15M-like.txt: default"
DECODE_15M_OLD = "uncommitted run: bench/decode.py, stories15M shape, an earlier run"
EARLIER_11 = "uncommitted run: an earlier run on this machine, so labelled in the prose"
RATIO_08B = "arithmetic on this run's outputs: tokens/s of one decoder over another's"
SWEEP13 = "uncommitted run: chapter 13's β sweep on its earlier, smaller label set"
BASE_RUN = "from 07d_base_model: its committed pretraining of the base model"
H4 = "from 97_sft_ablations: appendix H's fourth round (direction, distractors)"
DECLARED: dict[str, dict[str, str]] = {
    "01_data": {
        "1.3": "an illustrative loss in the argument, not a measurement",
        "38": "the entropy floor printed below (26.41 nats) in bits: 26.41/ln 2",
    },
    "03_rmsnorm": {"7%": RMSNORM_PAPER, "64%": RMSNORM_PAPER},
    "04_swiglu": {"64%": LLAMA2, "67%": LLAMA2, "1.3": LLAMA2},
    "05_attention": {"2.5": LLAMA2, "160": LLAMA2},
    "06_model": {"64%": LLAMA2, "67%": LLAMA2},
    "06b_interop": {
        "0.1": "the test model's initialisation std, a setting",
        "1.1": "TinyLlama-1.1B's size, a published model",
    },
    "07_pretraining": {
        "1.8": "an illustrative loss in the argument, not a measurement",
        "10% | decay to": "the cosine schedule's floor, a setting (Touvron et al.)",
        "5.2": README,
        "1.005": PRESET_TRIALS,
        "1.006": PRESET_TRIALS,
        "1.016": PRESET_TRIALS,
        "1.037": PRESET_TRIALS,
        "1.038": PRESET_TRIALS,
        "1.178": PRESET_TRIALS,
        "200 | H200": "from README.md: the H200 run of bench/gpu_check.sh",
        "48 | H200": "from README.md: the H200 run of bench/gpu_check.sh",
    },
    "07d_base_model": {
        "263": "uncommitted run: the same pretraining on a quiet machine",
        "7 | chapter 09's committed run": OLD_09,
        "12 | chapter 09's committed run": OLD_09,
    },
    "07c_training_panel": {
        "50% | every pair a tie": "a tie counts half: the starting point by definition",
        "100% | Chapter 11": "from 11_ppo: chapter 11's result",
        "65": "a T4's published fp16 tensor-core peak (NVIDIA)",
        "4.6": "arithmetic: the training words' mean length plus EOS (3.615 + 1)",
        "65%": "uncommitted run: an earlier committed run, so labelled",
        "1.2": "from tinyllama/grpo.py: the GRPO sampler's temperature (a setting)",
    },
    "08_generation": {
        "0.95": "an illustrative probability in the argument",
        "4,096": "the benchmark shape's vocabulary, a setting",
        "32,000": "llama2.c's stories15M config (published)",
        "5.25": "transformers' version",
        "7.7": "from bench/decode.py: the benchmark shape's parameter count",
        "26": "arithmetic: 4 bytes × 6.5 M weights (all but the embedding table)",
        "0.17": "arithmetic on the default-shape run's file: 28.1 / 163.0",
        "1.1": "arithmetic on the default-shape run's file: 178.7 / 163.0",
        "1.4": "arithmetic on the course-cpu run's file: 361.4 / 250.5",
        "0.41": "arithmetic on the course-cpu run's file: 102.1 / 250.5",
        "2.5": DECODE_CPU,
        "2,690": DECODE_CPU,
        "10.7": DECODE_CPU,
        "6,108": DECODE_CPU,
        "24": DECODE_CPU,
        "6.2": DECODE_CPU,
        "1.7": DECODE_DEFAULT,
        "2.1": DECODE_DEFAULT,
        "2.8": DECODE_DEFAULT,
        "9.7": DECODE_DEFAULT,
        "75%": DECODE_DEFAULT,
    },
    "08b_roofline": {
        "32,000": "llama2.c's stories15M config (published)",
        "0.5 | balance point": "a batch-1 fp32 step's operations per byte (arithmetic)",
        "6": "llama2.c's stories15M config (published)",
        "0.18": "torchao's version",
        "10.7": DECODE_CPU,
        "12.2": DECODE_CPU,
        "24.4": DECODE_CPU,
        "32.8": DECODE_CPU,
        "-0.03%": DECODE_CPU,
        "2.1": DECODE_15M_OLD,
        "4.4": DECODE_15M_OLD,
        "3.3": DECODE_15M_OLD,
        "3.0": DECODE_15M_OLD,
        "-0.01%": DECODE_15M_OLD,
        "0.04%": DECODE_15M_OLD,
        "6.5": "uncommitted run: an earlier torchao course-cpu run",
        "9.1": "uncommitted run: an earlier course-cpu run, one step per call",
        "2.9": RATIO_08B,
        "1.06": RATIO_08B,
    },
    "09_sft": {
        "5,000": "a hypothetical number of questions in the argument",
        "80%": "the profile's goal (issue 12), a target, not a measurement",
        "5 | whatever its rate": "the bound on each kind's interval (issue 11), asserted",
        "63.0%": "uncommitted run: an earlier run, up to eight questions per chat",
        "68.0%": "uncommitted run: a scratch run, so labelled",
        "65% | for sure": "uncommitted run: the earlier run with up to eight questions",
        "63.9%": "uncommitted run: an earlier committed run, so labelled",
        "26%": "uncommitted run: an earlier committed run, so labelled",
        "22.5%": H4,
        "20.4": H4,
        "24.6%": H4,
        "16.9%": H4,
        "15.1": H4,
        "18.9%": H4,
        "17.2%": H4,
        "15.4": H4,
        "19.2%": H4,
        "24.2%": H4,
        "22.1": H4,
        "26.4%": H4,
    },
    "97_sft_ablations": {
        "80%": "the cpu profile's goal (issue 12), a target, not a measurement",
        "5 | at most ±5": "the bound on each kind's interval (issue 11), asserted",
        "2.2": "arithmetic on the table: half the widest interval (colour, 22.0–26.3%)",
    },
    "10_reward": {
        "725": BASE_RUN,
        "26": "the alphabet's size, a setting",
        "75% | true accuracy": "a hypothetical accuracy in the argument",
        "376": "uncommitted run: a first-time base-model pretraining, empty cache",
        "96.3%": "arithmetic: the 95% Wilson interval of 100 of 100 (ci seed runs)",
    },
    "11_ppo": {
        "2,000": "the number of batches the check averages over, a setting",
        "3.70": "from 12_human_feedback: chapter 12's KL",
        "3.9": EARLIER_11,
        "9.3": EARLIER_11,
        "550": EARLIER_11,
        "3.1": EARLIER_11,
        "4.9": EARLIER_11,
        "99.6%": EARLIER_11,
        "52": "uncommitted run: one H200 run outside the committed run, so labelled",
        "1,000": "uncommitted run: one H200 run outside the committed run, so labelled",
        "0.26": "uncommitted run: one H200 run outside the committed run, so labelled",
        "0.30": "uncommitted run: one H200 run outside the committed run, so labelled",
        "62%": "uncommitted run: the tuning runs the prose describes",
        "86.8%": "uncommitted run: a scratch run of an earlier version, so labelled",
        "91%": "uncommitted run: a scratch run of an earlier version, so labelled",
        "94%": "uncommitted run: a scratch run of an earlier version, so labelled",
    },
    "12_human_feedback": {
        "725": BASE_RUN,
        "1.3": "InstructGPT's model size (Ouyang et al., 2022)",
        "0.5 | feeling word": "the scripted labeler's rule, a setting",
        "0.5 | slip": "the scripted labeler's rule, a setting",
        "20": "1/β with β = 0.05: arithmetic on a setting",
        "376": "uncommitted run: a first-time base-model pretraining, empty cache",
        "88.8%": SEEDS,
        "85.3%": SEEDS,
        "91.5%": SEEDS,
        "4.05": SEEDS,
        "318": SEEDS,
        "267": SEEDS,
        "283": SEEDS,
        "84.0%": SEEDS,
        "79.1%": SEEDS,
        "88.0%": SEEDS,
        "3.52": SEEDS,
        "309": SEEDS,
        "312": SEEDS,
        "88.3%": SEEDS,
        "83.9%": SEEDS,
        "91.6%": SEEDS,
        "90.0%": SEEDS,
        "86.7%": SEEDS,
        "92.6%": SEEDS,
        "3.71": SEEDS,
        "314": SEEDS,
        "265": SEEDS,
    },
    "13_dpo": {
        "725": BASE_RUN,
        "0.05 | | 0.05 |": "a value of β (a setting), the sweep table's first column",
        "0.05 | ten times": "chapter 12's β, a setting",
        "700": SWEEP13,
        "237": SWEEP13,
        "150": SWEEP13,
        "25": SWEEP13,
        "49.8%": SWEEP13,
        "47.1": SWEEP13,
        "62.7%": SWEEP13,
        "64.8%": SWEEP13,
        "57.2%": SWEEP13,
        "14.0": SWEEP13,
        "60.2%": SWEEP13,
        "15.9": SWEEP13,
        "63.7%": SWEEP13,
        "66.8%": SWEEP13,
        "68.0%": SWEEP13,
        "65.0%": SWEEP13,
        "10.5": SWEEP13,
        "47": SWEEP13,
        "14": SWEEP13,
        "1.3 | | 0.1 |": SWEEP13,
        "4.4 | | 0.1 |": SWEEP13,
        "1.0 | | 0.5 |": SWEEP13,
        "2.2 | | 0.5 |": SWEEP13,
        "5.0 | | 0.5 |": SWEEP13,
        "7 | ±6 to 7": SWEEP13,
        "318": SEEDS,
        "183": SEEDS,
        "76.0%": SEEDS,
        "70.5%": SEEDS,
        "66.1%": SEEDS,
        "61.2%": SEEDS,
        "5.74": SEEDS,
        "309": SEEDS,
        "166": SEEDS,
        "77.3%": SEEDS,
        "69.0%": SEEDS,
        "77.6%": SEEDS,
        "4.84": SEEDS,
        "314": SEEDS,
        "221": "from 12_human_feedback: chapter 12's loop",
        "981": "from 12_human_feedback: chapter 12's loop",
        "70.8%": "from 12_human_feedback: chapter 12's loop",
        "73.5%": SEEDS,
        "79.6%": SEEDS,
        "75.4%": SEEDS,
        "83.3%": SEEDS,
        "77.1%": SEEDS,
        "72.8%": SEEDS,
        "81.0%": SEEDS,
        "273": SEEDS,
    },
    "90_device": {
        "2.5": "torch versions",
        "2.6": "torch versions",
        "65,504": "float16's largest number (IEEE 754)",
    },
    "94_speedrun": {
        "150 | 4000": SPEEDRUN_SFT,
        "16 | 4000": SPEEDRUN_SFT,
        "4000": SPEEDRUN_SFT,
        "12": SPEEDRUN_PPO,
        "5": SPEEDRUN_PPO,
        "64": SPEEDRUN_PPO,
        "16 | 40 PPO steps": FEEDBACK,
        "100": FEEDBACK,
        "4 | (the chapter": FEEDBACK,
        "26": "chapter 11's alphabet, a to z (a setting)",
        "2 | 2 epochs": "from tinyllama/speedrun.py: the feedback stage's ppo_epochs",
        "4 | With 4 epochs": STAGE_TRIAL,
        "50": STAGE_TRIAL,
        "17": STAGE_TRIAL,
        "62%": STAGE_TRIAL,
        "72.5%": STAGE_TRIAL,
        "500": PRESET_TRIALS,
        "1.037": PRESET_TRIALS,
        "1.038": PRESET_TRIALS,
        "1.178": PRESET_TRIALS,
        "0.41": PRESET_TRIALS,
        "0.42": PRESET_TRIALS,
        "0.36": PRESET_TRIALS,
        "0.37": PRESET_TRIALS,
        "1,000": PRESET_TRIALS,
        "2,181": PRESET_TRIALS,
        "2,120": PRESET_TRIALS,
        "1.006": PRESET_TRIALS,
        "1.016": PRESET_TRIALS,
        "1.004": PRESET_TRIALS,
        "1.005": PRESET_TRIALS,
        "98%": "from tinyllama/speedrun.py: the PPO row's band (a setting)",
        "1.00 | The band": "from tinyllama/train.py: chapter 07's cpu pretraining band (a setting)",
        "1.08 | The band": "from tinyllama/train.py: chapter 07's cpu pretraining band (a setting)",
        "128": PRESET_TRIALS,
        "200 | after 200 steps": PRESET_TRIALS,
        "39.5%": PRESET_TRIALS,
        "64.5%": PRESET_TRIALS,
        "51%": PRESET_TRIALS,
        "71%": PRESET_TRIALS,
        "61.0%": PRESET_TRIALS,
        "0.0% | 26": PRESET_TRIALS,
        "300 | 26": PRESET_TRIALS,
        "99.5%": PRESET_TRIALS,
        "100.0% | seeds 0 to 5": PRESET_TRIALS,
        "130": PRESET_TRIALS,
    },
    "95_instructors": {
        "320": "from 05_attention: Llama-2-70B's KV bytes per token",
        "4,096": "Llama 2's context length (published)",
        "0.7": "a sampling temperature the exercise sets",
        "7,600": "the exercise's expected answer (arithmetic on Llama 2's config)",
        "99%": "a threshold the exercise names",
        "80%": "the exercise's share of correct labels, a setting",
        "20% | flipping": "the exercise's share of flipped labels, a setting",
        "140": "the exercise's expected answer (arithmetic on Llama 2's config)",
        "20 | leaves 20 GB": "the exercise's expected answer (arithmetic)",
        "8 | ratio explained": "the exercise's expected answer (H/K = 64/8)",
        "8 | mantissa": "bfloat16's format (8 significand bits)",
        "0.66": "the exercise's expected answer (arithmetic: 1 - (7/8)^8)",
    },
    "93_cli": {
        "1.08": "from tinyllama/train.py: chapter 07's cpu pretraining band, a preset setting",
    },
    "14b_rlvr": {
        "725": "from 07d_base_model: the base model's pretraining on a busy machine",
        "30": "the header's range for a reader's machine, not a measurement",
        "1.9": "uncommitted run: the lr 1e-3 trial the prose describes as a trial",
        "52%": "arithmetic on the per-kind table (feeling at 100%)",
    },
}

# Notebooks other helpers are re-running now (issue 10): checked, reported as xfail;
# the lead re-checks each after its re-run and removes it here. None at present.
PENDING: set[str] = set()


def declaration(stem: str, fig: Figure, where: str) -> tuple[str, str] | None:
    "The (key, reason) declaring `fig` (in sentence `where`) not from the run, or None."
    for key, reason in DECLARED.get(stem, {}).items():
        text, _, context = (s.strip() for s in key.partition("|"))
        if text == fig.text.replace("−", "-") and (not context or context in where):
            return key, reason
    return None


def _source(reason: str):
    "The notebook stem or repository file a `from ...` reason names, else None."
    m = re.match(r"from (\S+?)[,:;]?(?:\s|$)", reason)
    if not m:
        return None
    name = m.group(1)
    if (ROOT / "nbs" / f"{name}.ipynb").exists():
        return ("nb", name)
    if (ROOT / name).is_file():
        return ("file", name)
    return None


def problems(stem: str, nb: dict | None = None) -> tuple[list[str], int]:
    "A notebook's problems (one readable line each), and how many figures it checked."
    nb = notebook(stem) if nb is None else nb
    run = numbers_in(output_text(nb)) if nb is not notebook(stem) else run_numbers(stem)
    bad, n, used = [], 0, set()
    for text in prose(nb):
        for fig, where in quoted_figures(text):
            n += 1
            found = declaration(stem, fig, where)
            if found is None:
                if not matches(fig, run):
                    bad.append(f"{stem}: {fig} is not in its outputs: «{where}»")
                continue
            key, reason = found
            used.add(key)
            src = _source(reason)
            if src:
                there = run_numbers(src[1]) if src[0] == "nb" else file_numbers(src[1])
                if not matches(fig, there):
                    why = f"is declared '{reason}', not there"
                    bad.append(f"{stem}: {fig} {why}: «{where}»")
    for key in DECLARED.get(stem, {}).keys() - used:
        bad.append(f"{stem}: DECLARED[{stem!r}][{key!r}] matches no figure: remove it")
    return bad, n


def _params():
    for path in NBS:
        why = "in PENDING (re-run under way); once it passes, remove it there"
        marks = [pytest.mark.xfail(reason=why, strict=True)]
        marks = marks if path.stem in PENDING else []
        yield pytest.param(path.stem, id=path.stem, marks=marks)


@pytest.mark.parametrize("stem", list(_params()))
def test_prose_figures_come_from_the_committed_run(stem):
    bad, _ = problems(stem)
    assert not bad, f"{len(bad)} problem(s) with quoted figures:\n" + "\n".join(bad)


def test_declarations_name_real_notebooks_and_sources():
    stems = {p.stem for p in NBS}
    assert DECLARED.keys() <= stems and PENDING <= stems
    for stem, entries in DECLARED.items():
        for key, reason in entries.items():
            if reason.startswith("from "):
                assert _source(reason), (
                    f"{stem}/{key}: '{reason}' names no notebook or file"
                )


@pytest.mark.parametrize(
    "prose_text, printed, ok",
    [
        ("a win rate of 82.5%", "win rate 0.825", True),
        ("a win rate of 82.5%", "win rate 82.5%", True),
        ("a win rate of 82%", "win rate 0.8246", True),
        ("a share of 64%", "heads 64/8", False),  # a bare integer is no share
        ("a share of 100%", "1 of 1", False),
        ("a KL of 3.9 nats", "kl 3.91", True),  # a rounded form
        ("a KL of 3.91 nats", "kl 3.9", False),  # more digits than were printed
        ("a KL of 3.92 nats", "kl 3.91", False),
        ("a KL of 3.90 nats", "kl 3.9", True),  # the same value
        ("at 13,173 tokens/s", "13173 tokens/s", True),
        ("at 1,650 tokens/s", "1,650 tokens/s", True),
        ("reward −0.61 → 1.11", "reward -0.61 -> 1.11", True),
        ("reward −0.61", "reward 0.61", False),
        ("it took 650 s", "took 650.3 s", True),
        ("it took 2.4 min", "took 144.0 s", True),
        ("it took 2.4 min", "took 150 s", False),
        ("7.7 M parameters", "7,712,345 parameters", True),
        ("414 pairs", "413 pairs", False),
        ("NLL/floor 1.037", "ratio 1.010", False),
    ],
)
def test_the_matching_rules(prose_text, printed, ok):
    fig, _ = next(quoted_figures(prose_text))
    assert matches(fig, numbers_in(printed)) == ok


@pytest.mark.parametrize(
    "text",
    [
        "Vaswani et al. (section 3.5) and PaLM §4.1, arXiv:2305.07759",
        "in `lr=3e-4` and $0.5$ and [a link](https://x.org/1.5)",
        "Llama 2-7B, a 1B model, the 2nd try, torch < 2.5 and capability 8.0",
        "Table 3.2 of the paper, Python ≥ 3.10, version 0.18",
        "about 15 s, at least 75%, below 15 nats, ≈0.4%",
        "a 95% interval, with β = 0.05",
        "in 2017 with 12 heads",
    ],
)
def test_what_is_not_a_quoted_figure(text):
    assert list(quoted_figures(text)) == []


def test_what_is_a_quoted_figure():
    text = (
        "It took 650 s and 3.4 min: 82.5% of 200, 414 pairs, 13,173 tokens/s, 2.3×;"
        " 151 of 200 won, 157 → 147 parsed, 1,241 in all, 1,212\n  parameters;"
        " suitable 3.5, handsome 2.5 s, moreover 4.2%."
    )
    got = [str(f) for f, _ in quoted_figures(text)]
    assert got == [
        "650 s",
        "3.4 min",
        "82.5%",
        "414 pairs",
        "13,173 tokens/s",
        "2.3 ×",
        "151",
        "157",
        "147",
        "1,241",
        "1,212 parameters",
        "3.5",
        "2.5 s",
        "4.2%",
    ]


def test_a_declaration_is_checked_against_its_source(monkeypatch):
    "A `from X` whose X does not hold the figure fails, and so does a stale entry."
    assert problems("95_instructors")[0] == []
    entries = dict(DECLARED["95_instructors"], **{"320": "from 01_data: wrong source"})
    monkeypatch.setitem(DECLARED, "95_instructors", entries)
    bad = problems("95_instructors")[0]
    assert len(bad) == 1 and "320 KiB is declared 'from 01_data" in bad[0], bad
    entries = dict(DECLARED["95_instructors"], **{"9.99": "a figure nobody quotes"})
    monkeypatch.setitem(DECLARED, "95_instructors", entries)
    assert any("['9.99'] matches no figure" in b for b in problems("95_instructors")[0])


def _checked_figures(stem: str):
    "(cell index, span, Figure) of each figure of a notebook that its run holds."
    run = run_numbers(stem)
    for i, cell in enumerate(notebook(stem)["cells"]):
        if cell["cell_type"] == "markdown":
            for fig, where, span in _figures("".join(cell["source"])):
                if declaration(stem, fig, where) is None and matches(fig, run):
                    yield i, span, fig


def _stale(fig: Figure, stem: str) -> str:
    "A value near `fig`, written as the prose writes it, that the run does not hold."
    run = run_numbers(stem)
    declared = {key.partition("|")[0].strip() for key in DECLARED.get(stem, {})}
    step = Decimal(10) ** -fig.decimals
    for k in range(1, 1000):
        value = fig.value + k * 7 * step
        comma = "," if "," in fig.text else ""
        text = f"{value:{comma}.{fig.decimals}f}" + ("%" if fig.percent else "")
        if text not in declared and not matches(Figure(text, fig.unit, fig.scale), run):
            return text
    raise AssertionError(f"no stale value found near {fig.text}")


def _mutation_cases():
    "For each notebook outside PENDING: its first, middle and last figure from the run."
    for path in NBS:
        found = [] if path.stem in PENDING else list(_checked_figures(path.stem))
        picked = [found[0], found[len(found) // 2], found[-1]] if found else []
        for i, span, fig in dict.fromkeys(picked):  # in order: xdist workers agree
            yield pytest.param(path.stem, i, span, fig, id=f"{path.stem}-{fig.text}")


@pytest.mark.parametrize("stem, index, span, fig", list(_mutation_cases()))
def test_a_changed_figure_is_caught(stem, index, span, fig):
    "Typing a different value for one quoted figure, in a copy of the notebook, fails."
    nb = json.loads(json.dumps(notebook(stem)))
    cell = nb["cells"][index]
    src = "".join(cell["source"])
    old = src[span[0] : span[1]]
    new = _stale(fig, stem)
    cell["source"] = src[: span[0]] + new + src[span[1] :]
    bad = [b for b in problems(stem, nb)[0] if "not in its outputs" in b]
    assert len(bad) == 1 and bad[0].startswith(f"{stem}: {new}"), (old, new, bad)
    sentence_of_it = bad[0].split("«")[1]
    assert new in sentence_of_it  # the notebook, the figure and the sentence around it
