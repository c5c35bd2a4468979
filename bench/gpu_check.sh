#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU (run from anywhere; at most about 9 minutes,
# less where $GPU_CHECK_SCALE_PCT (default 100) scales every step's time limit).
# Every step has its own time limit and a failed or timed-out step does not stop the others:
# the summary at the end says which passed. torch must already be installed (with CUDA).
#   1. torch, the GPU, its compute capability and whether bf16 is native there;
#   2. the package installed editable without touching torch (fallback: PYTHONPATH);
#   3. chapter 07 in the gpu profile: pretraining (bf16 or fp16 + scaler, torch.compile) on the
#      story world through `tinyllama speedrun --stages pretrain,samples`: held-out NLL against the
#      entropy floor, tokens/s and MFU against a matmul peak measured on the same GPU;
#   4. one resume cycle on the GPU: `tinyllama pretrain` for N steps, then --resume to 2N;
#   5. bench/train_throughput.py on CUDA (bf16 where native, compiled): ours vs transformers;
#   6. batch-1 decode tokens/s on the GPU (generate with and without the KV cache, and the
#      CompiledDecoder), on the checkpoint of step 3;
#   7. chapter 11 (PPO on the copy task) in the gpu profile, its code cells run in order.
# Results go to $OUT (or runs/gpu-check-<time>/) and to stdout.
# Usage: bash bench/gpu_check.sh [STEPS]      (default 300 pretraining steps)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEPS=${1:-300}
DEST=${OUT:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$DEST"
t_start=$(date +%s)
SUMMARY=()
stamp() { echo; echo "== [$(( $(date +%s) - t_start )) s] $*"; }
# step NAME SECONDS CMD...: runs CMD under a time limit and records how it ended.
step() {
  local name=$1 limit=$(( $2 * ${GPU_CHECK_SCALE_PCT:-100} / 100 )); shift 2
  stamp "$name (limit ${limit} s)"
  local t0=$(date +%s)
  timeout "$limit" "$@"
  local rc=$?
  local how=passed; [ $rc -eq 124 ] && how="TIMED OUT"; [ $rc -ne 0 ] && [ $rc -ne 124 ] && how="FAILED (rc $rc)"
  SUMMARY+=("$(printf '%-34s %-16s %4d s' "$name" "$how" $(( $(date +%s) - t0 )))")
}

stamp "torch and the GPU"
$PY - <<'PYEOF' || { echo "this check needs torch with a visible CUDA GPU" >&2; exit 1; }
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if not torch.cuda.is_available(): sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
      f"bf16 native: {(p.major, p.minor) >= (8, 0)} (torch's is_bf16_supported: {torch.cuda.is_bf16_supported()})")
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv

stamp "install the package (torch left as it is)"
if $PY -m pip install -q --no-deps --no-build-isolation -e . 2>"$DEST/pip.log"; then
  echo "installed tinyllama-course (editable)"
else
  echo "pip install -e . failed (see $DEST/pip.log); using PYTHONPATH=$PWD instead"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
$PY -c "import tinyllama, torch; from tinyllama.device import device_report; print('tinyllama', tinyllama.__version__, device_report())"

step "07 pretraining, gpu profile" 200 $PY -m tinyllama.cli speedrun --profile gpu --steps "$STEPS" \
  --stages pretrain,samples --corpus story_world --device cuda --out "$DEST/speedrun" --no-progress
[ -f "$DEST/speedrun/report.md" ] && sed -n '/^| metric/,/^$/p' "$DEST/speedrun/report.md"

step "resume cycle on the GPU" 90 bash -c "
  $PY -m tinyllama.cli pretrain --profile gpu --steps 40 --corpus story_world --device cuda \
      --out '$DEST/resume' --no-progress &&
  $PY -m tinyllama.cli pretrain --profile gpu --steps 80 --corpus story_world --device cuda \
      --out '$DEST/resume' --resume --no-progress &&
  $PY -c \"import json,sys; rows=[json.loads(l) for l in open('$DEST/resume/metrics.jsonl')];
steps=[r['step'] for r in rows if 'loss' in r]; print('logged steps', steps[:3], '...', steps[-3:]);
sys.exit(0 if steps[-1] == 80 and steps == sorted(steps) else 'the resumed log does not run on to step 80')\""

bf16=$($PY -c "import torch; print('--bf16' if torch.cuda.get_device_capability(0) >= (8, 0) else '')")
step "train throughput (CUDA, compiled)" 120 $PY bench/train_throughput.py --device cuda $bf16 --compile \
  --batch 32 --steps 10 --warmup 3 --rounds 3

step "decode on the GPU (batch 1)" 90 $PY - "$DEST/speedrun/checkpoint" <<'PYEOF'
import sys, time, torch
from tinyllama.checkpoint import load_model
from tinyllama.generate import generate, CompiledDecoder
from tinyllama.tokenizer import Tokenizer
model = load_model(sys.argv[1], device="cuda")
bos = Tokenizer.load(f"{sys.argv[1]}/tokenizer.model").bos_id
n = min(256, model.config.context_size - 1)
def best(fn):
    fn(8); times = []
    for _ in range(3):
        torch.cuda.synchronize(); t0 = time.perf_counter(); out = fn(n)
        torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
    return len(out) / min(times)
dec = CompiledDecoder(model)
for name, fn in [("KV cache", lambda k: generate(model, [[bos]], k, temperature=0)[0]),
                 ("no cache", lambda k: generate(model, [[bos]], k, temperature=0, use_cache=False)[0]),
                 ("CompiledDecoder", lambda k: dec.generate([bos], k))]:
    print(f"GPU fp32 decode, {name}: {best(fn):,.0f} tokens/s ({n} new tokens, best of 3)")
PYEOF

step "11 PPO, gpu profile" 200 env TINYLLAMA_PROFILE=gpu $PY - nbs/11_ppo.ipynb <<'PYEOF'
import json, sys, types
try:
    import IPython.display  # noqa: F401
except ImportError:  # a bare GPU machine: a display() that prints is enough here
    ip = types.ModuleType("IPython"); ip.display = types.ModuleType("IPython.display")
    ip.display.display = print; ip.display.HTML = str; ip.display.Markdown = str
    sys.modules.update({"IPython": ip, "IPython.display": ip.display})
ns = {"__name__": "__main__"}
for cell in json.load(open(sys.argv[1]))["cells"]:
    src = "".join(cell["source"])
    if cell["cell_type"] != "code" or src.startswith("#| hide") or "NBVAL_SKIP" in src: continue
    exec(compile("\n".join(l for l in src.splitlines() if not l.startswith(("%", "!"))), "cell", "exec"), ns)
PYEOF

stamp "summary"
printf '%s\n' "${SUMMARY[@]}" | tee "$DEST/summary.txt"
