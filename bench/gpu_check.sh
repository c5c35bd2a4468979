#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU (run from anywhere; about 5-8 minutes):
#   1. torch must already be installed (with CUDA); this script never installs torch;
#   2. the package is installed editable without touching torch (offline-safe fallback: PYTHONPATH);
#   3. gpu-profile pretraining for a few hundred steps with bf16 autocast and torch.compile, on the
#      built-in story world (no download), through `tinyllama speedrun`: its table prints the
#      held-out NLL vs the entropy floor, training tokens/s and MFU against a bf16 matmul peak
#      measured on the same GPU, and wall time;
#   4. decode tokens/s: batch-1 greedy with the KV cache on the GPU (the checkpoint just trained),
#      then bench/decode.py (ours vs transformers vs no cache, on this machine's CPU).
# Results go to $OUT (or runs/gpu-check-<time>/) and to stdout.
# Usage: bash bench/gpu_check.sh [STEPS]      (default 300 pretraining steps)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEPS=${1:-300}
DEST=${OUT:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$DEST"
t_start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t_start )) s] $*"; }

stamp "torch and the GPU"
if ! $PY -c "import torch" 2>/dev/null; then
  echo "torch is not importable with $PY; this check expects a machine with a CUDA torch preinstalled." >&2
  exit 1
fi
$PY - <<'EOF'
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU is visible to torch; this check is for a GPU machine.")
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16: {torch.cuda.is_bf16_supported()}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv || true

stamp "install the package (torch left as it is)"
missing=$($PY - <<'EOF'
import importlib.util
need = {"sentencepiece": "sentencepiece", "safetensors": "safetensors", "tqdm": "tqdm", "matplotlib": "matplotlib",
        "numpy": "numpy", "ipywidgets": "ipywidgets", "transformers": "transformers"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "installing missing dependencies: $missing"
  $PY -m pip install -q $missing || echo "warning: could not install $missing (offline?); the steps that need them may fail"
fi
# --no-deps: the preinstalled CUDA torch must stay; --no-build-isolation: works offline.
if $PY -m pip install -q --no-deps --no-build-isolation -e . 2>"$DEST/pip.log"; then
  echo "installed tinyllama-course (editable)"
else
  echo "pip install -e . failed (see $DEST/pip.log); using PYTHONPATH=$PWD instead"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import tinyllama, torch; print('tinyllama', tinyllama.__version__, 'from', tinyllama.__file__, '| torch', torch.__version__)"

stamp "gpu-profile pretraining: $STEPS steps, bf16, torch.compile, story world"
# The gpu preset has compile=True and precision 'auto' (bf16 on GPUs that support it).
timeout 360 $PY -m tinyllama.cli speedrun --profile gpu --steps "$STEPS" --corpus story_world \
  --device cuda --out "$DEST/speedrun" --no-progress
$PY - "$DEST/speedrun/checkpoint" <<'EOF'
import json, statistics, sys
from pathlib import Path
rows = [json.loads(l) for l in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines() if l.strip()]
tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
print(f"logged intervals: {len(tps)}; tokens/s first {tps[0]:,.0f} (includes compilation), "
      f"median {statistics.median(tps):,.0f}, last {tps[-1]:,.0f}")
EOF

stamp "decode tokens/s on the GPU (batch 1, greedy, KV cache, the checkpoint above)"
timeout 90 $PY - "$DEST/speedrun/checkpoint" <<'EOF'
import sys, time, torch
from tinyllama.checkpoint import load_model
from tinyllama.generate import generate
from tinyllama.tokenizer import Tokenizer
model = load_model(sys.argv[1], device="cuda")
bos = Tokenizer.load(f"{sys.argv[1]}/tokenizer.model").bos_id
n = min(256, model.config.context_size - 1)
for use_cache in (True, False):
    generate(model, [[bos]], max_new_tokens=8, temperature=0, use_cache=use_cache)  # warm-up
    times = []
    for _ in range(3):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        out = generate(model, [[bos]], max_new_tokens=n, temperature=0, use_cache=use_cache)
        torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
    print(f"GPU fp32 decode, {'KV cache' if use_cache else 'no cache'}: {len(out[0]) / min(times):,.0f} tokens/s "
          f"({len(out[0])} tokens, best of 3)")
EOF

stamp "bench/decode.py (CPU of this machine: ours vs transformers vs no cache)"
timeout 150 $PY bench/decode.py --quick 2>&1 | tee "$DEST/decode.txt"

stamp "done; report: $DEST/speedrun/report.md"
sed -n '/^| metric/,/^$/p' "$DEST/speedrun/report.md"
