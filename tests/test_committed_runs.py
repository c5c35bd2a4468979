"""The committed outputs are a run of the current code, and the headers' times are kept.

A chapter starts `ChapterClock("NN")` and ends with `clock.stamp(name=preset, ...)`, which
prints `chapter NN · profile cpu · <time> · presets name=<digest> ...` (appendix B). This
test reads that line from the committed outputs and
- requires the `cpu` profile (the book shows `cpu` runs);
- recomputes each named preset's digest from the code as it is now (a stale run fails);
- fails when the run took more than 1.5 times the `cpu` time the header's **Time:** states.
"""
import importlib
import json
import pathlib
import re

import pytest

from tinyllama.profiles import preset_digest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / "nbs").glob("[0-9]*.ipynb"))
STAMP = re.compile(r"chapter (\S+) · profile (\w+) · ([\d.]+) (s|min) · presets (.*)")
PRESETS = {  # the name a stamp uses -> the preset function it must match (cpu profile)
    "pretrain": ("tinyllama.train", "pretrain_preset"),
    "base": ("tinyllama.base", "base_preset"),
    "sft": ("tinyllama.sft", "sft_preset"),
    "ppo": ("tinyllama.ppo", "ppo_preset"),
    "feedback": ("tinyllama.feedback", "feedback_preset"),
    "dpo": ("tinyllama.dpo", "dpo_preset"),
    "rlvr": ("tinyllama.rlvr", "rlvr_preset"),
    "overopt": ("tinyllama.overoptimisation", "overopt_preset"),
    "grpo": ("tinyllama.grpo", "grpo_preset"),
}
# Chapters whose committed run does not print a stamp yet. The list may only shrink: a new
# chapter, or one that lost its stamp, fails below.
NOT_YET = {
    "00_index", "91_profiles", "93_cli", "94_speedrun", "95_instructors",
    "96_api", "97_sft_ablations",
}
_UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "min": 60, "minute": 60, "minutes": 60}
_WORDS = {"a": 1, "one": 1, "two": 2, "three": 3, "a few": 5, "few": 5, "ten": 10, "half a": 0.5}


def stated_cpu_seconds(header: str) -> float | None:
    "The longest `cpu` time a header's **Time:** paragraph gives, in seconds."
    m = re.search(r"\*\*Time:\*\*(.*?)(?:\n\n|$)", header, re.S)
    if not m:
        return None
    text = m.group(1).replace("\n", " ")
    if "every profile" in text:
        clause = text
    else:
        start = re.search(r"`?cpu`?", text)
        if not start:
            return None
        clause = re.split(r"`?gpu`?", text[start.end():])[0]
    num = r"(\d+(?:\.\d+)?|half a|a few|few|a|one|two|three|ten)"
    found = re.findall(num + r"\s+(seconds?|sec|s|minutes?|min)\b", clause)
    vals = [(_WORDS[n] if n in _WORDS else float(n)) * _UNITS[u] for n, u in found]
    return max(vals) if vals else None


def stamps(nb: dict) -> list[re.Match]:
    out = []
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            text = "".join(o.get("text", "")) if o.get("output_type") == "stream" else ""
            out += [m for m in map(STAMP.search, text.splitlines()) if m]
    return out


def test_the_header_parser_reads_the_course_s_phrasings():
    h = "**Time:** `ci` about half a minute; `cpu` 3 to 10 minutes on one thread; `gpu` a few"
    assert stated_cpu_seconds(h) == 600
    assert stated_cpu_seconds("**Time:** ci a few seconds · cpu under a minute · gpu x") == 60
    assert stated_cpu_seconds("**Time:** under a second in every profile.") == 1
    assert stated_cpu_seconds("**Time:** reading only.") is None


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.stem)
def test_each_chapter_s_committed_run_matches_the_code_and_its_header(path):
    nb = json.loads(path.read_text())
    found = stamps(nb)
    if path.stem in NOT_YET:
        assert not found, f"{path.name} prints a stamp now: remove it from NOT_YET"
        return
    assert len(found) == 1, f"{path.name}: expected one stamp line, found {len(found)}"
    chapter, profile, took, unit, presets = found[0].groups()
    assert path.stem.startswith(chapter), (path.name, chapter)
    assert profile == "cpu", f"{path.name}: the committed run used the {profile} profile"
    for item in presets.split():
        if item == "-":  # a chapter without presets
            continue
        name, digest = item.split("=")
        module, fn = PRESETS[name]
        now = preset_digest(getattr(importlib.import_module(module), fn)("cpu"))
        assert digest == now, (
            f"{path.name}: its committed run used another {name} preset than the code "
            "has now; re-run it in the cpu profile"
        )
    stated = stated_cpu_seconds("".join(nb["cells"][0]["source"]))
    assert stated, f"{path.name}: the header gives no cpu time"
    seconds = float(took) * (60 if unit == "min" else 1)
    assert seconds <= 1.5 * stated, (
        f"{path.name}: the committed run took {seconds:.0f} s, the header says "
        f"{stated:.0f} s in cpu; correct the header (or the run)"
    )


def test_not_yet_names_only_real_chapters():
    assert NOT_YET <= {p.stem for p in NBS} | {"08b_roofline", "95_instructors", "96_api"}
