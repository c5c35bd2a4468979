"""Measure the quantities chapters 10, 12 and 13 assert, over seeds and profiles.

Runs a chapter's code cells (up to its band checks) with the seeds changed, in a fresh
process per run, and appends one JSON line per run to the output file. A band check
that fails is recorded, not fatal. One thread; run it in the background:

    nohup env OMP_NUM_THREADS=1 .venv/bin/python scripts/seed_bands.py \
        --runs 10:ci:0,1,2 12:ci:0,1,2 10:cpu:0,1,2 12:cpu:0,1,2 \
        --out bench/seed_bands.jsonl > /tmp/seed_bands.log 2>&1 &

`12:cpu:0:nopen` runs chapter 12 with the missing-EOS penalty off (the before figure).
With more cores, `--jobs 4 --threads 4` runs four at once, four threads each.
"""

import argparse, json, os, re, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NB = {
    "10": "nbs/10_reward.ipynb",
    "12": "nbs/12_human_feedback.ipynb",
    "13": "nbs/13_dpo.ipynb",
}
LAST = {  # the last cell run
    "10": "band = P.pick(",
    "12": 'met = loop.verdict["win_rate"]',
    "13": "bands = dict(",
}


def patched(chapter: str, src: str, seed: int, penalty: bool) -> str:
    "A cell's source with the chapter's seeds replaced by `seed`."
    src = src.replace("torch.manual_seed(0)", f"torch.manual_seed({seed})")
    if chapter == "10":
        src = src.replace('seed="reward/train"', f'seed="reward/train/{seed}"')
        src = src.replace('seed="reward/heldout"', f'seed="reward/heldout/{seed}"')
        src = re.sub(r"(\n\s+eval_every=[^\n]*\n\s+)seed=0,", rf"\1seed={seed},", src)
    elif chapter == "13":  # π_SFT as chapter 12's run of the same seed
        src = src.replace(
            "sft_policy.config.context_size, seed=0",
            f"sft_policy.config.context_size, seed={seed}",
        )
        src = src.replace(
            "run_dpo(sft_policy, tok, workdir, preset, seed=0)",
            f"run_dpo(sft_policy, tok, workdir, preset, seed={seed})",
        )
    else:
        # the notebook's own feedback_preset (its cells define the classes again)
        preset = (
            "None"
            if penalty
            else (
                "__import__('dataclasses').replace("
                "feedback_preset(), missing_eos_penalty=None)"
            )
        )
        src = src.replace(
            "sft_policy.config.context_size, seed=0",
            f"sft_policy.config.context_size, seed={seed}",
        )
        src = src.replace(
            "run_feedback_loop(sft_policy, tok, workdir, seed=0)",
            f"run_feedback_loop(sft_policy, tok, workdir, {preset}, seed={seed})",
        )
    return src


def metrics(chapter: str, ns: dict) -> dict:
    "The asserted quantities from the chapter's namespace."
    if chapter == "10":
        n = len(ns["heldout_pairs"])
        return dict(
            rm_accuracy=ns["acc_after"], n_val=n, acc_before=ns["acc_before"],
            acc_matched=ns.get("acc_matched"), acc_other=ns.get("acc_other"),
        )  # fmt: skip
    if chapter == "13":
        dpo, parses = ns["dpo"], ns["parses"]
        v = dpo.verdict
        return dict(
            rm_accuracy=dpo.accuracy, n_val=dpo.n_val_pairs,
            n_train=dpo.n_train_pairs, win_rate=v["win_rate"], wins=v["wins"],
            ties=v["ties"], losses=v["losses"], n=v["n"], kl_mean=dpo.kl_mean,
            parsable_before=sum(map(parses, dpo.before)),
            parsable_after=sum(map(parses, dpo.after)), seconds=dpo.seconds,
            split_accuracy=dpo.split_accuracy, n_extra_val=dpo.n_extra_val,
        )  # fmt: skip
    loop, parses = ns["loop"], ns["parses"]
    v = loop.verdict
    return dict(
        rm_accuracy=loop.rm_accuracy, n_val=loop.n_val_pairs,
        n_train=loop.n_train_pairs, win_rate=v["win_rate"], wins=v["wins"],
        ties=v["ties"], losses=v["losses"], n=v["n"], kl_mean=loop.kl_mean,
        parsable_before=sum(map(parses, loop.before)),
        parsable_after=sum(map(parses, loop.after)),
        sft_parsable_share=ns.get("share"),
        reward_first=loop.history[0]["env/reward_mean"],
        reward_last=loop.history[-1]["env/reward_mean"],
        seconds=loop.seconds,
    )  # fmt: skip


def intervals(out: dict) -> dict:
    "The 95% Wilson intervals of the accuracy and the win rate (the prose quotes them)."
    from tinyllama.sft import wilson_interval

    acc, n = out["rm_accuracy"], out["n_val"]
    out["rm_interval"] = wilson_interval(round(acc * n), n)
    if "win_rate" in out:
        out["win_interval"] = wilson_interval(
            round(out["win_rate"] * out["n"]), out["n"]
        )
    return out


def run_one(
    chapter: str, seed: int, penalty: bool, nb: str | None = None, threads: int = 1
) -> dict:
    "Run the chapter's cells in this process; its metrics and any failed checks."
    import torch

    torch.set_num_threads(threads)
    cells = json.loads((ROOT / (nb or NB[chapter])).read_text())["cells"]
    ns, failed, t0 = {"__name__": "__main__"}, [], 0
    t0 = time.perf_counter()
    os.chdir(ROOT / "nbs")
    for c in cells:
        if c["cell_type"] != "code":
            continue
        src = "".join(c["source"])
        if (src.startswith("#| hide") and "pip" in src) or "PPOPanel(" in src:
            continue  # the installer; the post-training panel (not measured here)
        try:
            exec(compile(patched(chapter, src, seed, penalty), "<cell>", "exec"), ns)
        except AssertionError as e:
            failed.append(f"{src.strip().splitlines()[0][:60]}: {e}"[:300])
        if LAST[chapter] in src:
            break
    out = intervals(metrics(chapter, ns))
    out.update(failed_checks=failed, wall_s=time.perf_counter() - t0)
    return out


def _rate(rate, n):
    from tinyllama.sft import wilson_interval

    lo, hi = wilson_interval(round(rate * n), n)
    return f"{rate:.1%} of {n} ({lo:.1%}–{hi:.1%})"


def table(recs: list) -> str:
    "Markdown tables of the runs: one row per chapter, profile, seed and penalty."
    out = []
    for r in recs:
        if "error" in r:
            out.append(f"| {r['chapter']} | {r['profile']} | {r['seed']} | error |")
            continue
        head = f"| {r['chapter']} | {r['profile']} | {r['seed']} | "
        acc = _rate(r["rm_accuracy"], r["n_val"])
        if r["chapter"] == "10":
            out.append(head + f"{acc} | | | | {len(r['failed_checks'])} |")
            continue
        n, pen = r["n"], "on" if r["penalty"] else "off"
        out.append(
            head + f"{acc} | {_rate(r['win_rate'], n)} | {r['kl_mean']:.2f} | "
            f"{r['parsable_before']} → {r['parsable_after']} of {n} (EOS penalty {pen})"
            f" | {len(r['failed_checks'])} |"
        )
    top = (
        "| chapter | profile | seed | RM held-out accuracy | win rate | KL (nats) "
        "| parsable stories | failed checks |\n|---|---|---|---|---|---|---|---|"
    )
    return top + "\n" + "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", help="CHAPTER:PROFILE:SEEDS[:nopen]")
    ap.add_argument("--out", default="bench/seed_bands.jsonl")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # CHAPTER:SEED:PEN, in a child
    ap.add_argument(
        "--nb",
        help="run this copy of the notebook (e.g. a snapshot taken at the start)",
    )
    ap.add_argument(
        "--table", action="store_true", help="print --out as Markdown tables"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once")
    a = ap.parse_args()
    if a.table:
        print(table([json.loads(x) for x in open(ROOT / a.out) if x.strip()]))
        return
    if a.one:
        chapter, seed, pen = a.one.split(":")
        rec = run_one(chapter, int(seed), pen == "1", a.nb, a.threads)
        print("RESULT " + json.dumps(rec))
        return
    jobs = []
    for spec in a.runs:
        chapter, profile, seeds, *flag = spec.split(":")
        pen = "0" if flag == ["nopen"] else "1"
        jobs += [(chapter, profile, int(s), pen) for s in seeds.split(",")]
    lock = __import__("threading").Lock()

    def one(job):
        chapter, profile, seed, pen = job
        env = dict(os.environ, TINYLLAMA_PROFILE=profile, MPLBACKEND="Agg")
        env["OMP_NUM_THREADS"] = str(a.threads)
        cmd = [sys.executable, __file__, "--one", f"{chapter}:{seed}:{pen}"]
        cmd += ["--nb", str(Path(a.nb).resolve())] if a.nb else []
        cmd += ["--threads", str(a.threads)]
        t = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        rows = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        rec = dict(chapter=chapter, profile=profile, seed=seed, penalty=pen == "1")
        if rows:
            rec.update(json.loads(rows[-1][7:]))
        else:
            rec.update(error=p.stderr[-2000:])
        rec.update(process_s=time.perf_counter() - t, threads=a.threads)
        with lock, open(ROOT / a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(a.jobs) as ex:
        list(ex.map(one, jobs))


if __name__ == "__main__":
    main()
