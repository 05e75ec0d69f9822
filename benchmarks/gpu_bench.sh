#!/usr/bin/env bash
# The benchmark set on one GPU (H100 / H200), n up to 4096, in one short run (< 8 minutes).
#
#   OUT=/some/dir bash benchmarks/gpu_bench.sh          # from the repository root
#
# Needs a Python with jax[cuda] (and, for the PyTorch baselines, a CUDA build of torch 2.13)
# plus this package's dependencies; `PYTHON` picks the interpreter (default: .venv/bin/python
# when present, else python3). The source tree is put on PYTHONPATH, so no install is needed.
# Without torch (or without CUDA in torch) the simulation benchmark times dicejax alone.
#
# Writes under $OUT (default benchmarks/results/gpu):
#   gpu.txt                       nvidia-smi's card name, memory, driver
#   env.json                      versions, jax backend and devices
#   bench_simulate_mlp.json       MLP 784-128-10, n = 16, 256, 1024, 4096 (reference loop <= 256,
#                                 torch.compile <= 1024: each size is one more compile)
#   bench_simulate_cnn.json       the paper's CNN, n = 16, 256, 1024 (reference loop <= 16,
#                                 torch.compile <= 256)
#   bench_influence.json          all-source DICE-E, 64-node exponential graph, r = 1, 2, 3
#   *.log                         each stage's console output
# Each stage runs under its own `timeout`, writes its JSON as it goes (partial results
# survive), and a failed stage does not stop the next. Stage budgets: 180 + 120 + 90 s.
#
# TINY=1 runs the same stages on the CPU with tiny sizes (a check of the script itself):
#   TINY=1 OUT=/tmp/gpu_tiny bash benchmarks/gpu_bench.sh
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX and torch share the card
mkdir -p "$OUT"
start=$(date +%s)

DEVICE=cuda MLP_NODES=16,256,1024,4096 CNN_NODES=16,256,1024 INF_NODES=64 REPEATS=3
MLP_STEPS="--min-steps 10 --max-steps 50" CNN_STEPS="--min-steps 5 --max-steps 20"
if [ "${TINY:-0}" = 1 ]; then
    DEVICE=cpu MLP_NODES=4,8 CNN_NODES=4 INF_NODES=8 REPEATS=1
    MLP_STEPS="--steps 2" CNN_STEPS="--steps 2"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 \
    || echo "nvidia-smi not available" > "$OUT/gpu.txt"
cat "$OUT/gpu.txt"

"$PYTHON" - > "$OUT/env.json" <<'EOF'
import json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import jax, jaxlib
    info.update(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
                devices=[str(d) for d in jax.devices()],
                device_kind=getattr(jax.devices()[0], "device_kind", None))
except Exception as e:  # report, do not fail: the stages below say what ran
    info["jax_error"] = repr(e)
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.cuda.is_available(),
                torch_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
except Exception as e:
    info["torch_error"] = repr(e)
print(json.dumps(info, indent=2))
EOF
cat "$OUT/env.json"

# torch baselines only where torch sees the device; otherwise dicejax alone
if "$PYTHON" -c "import torch, sys; sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 1)" 2>/dev/null
then
    SIM_METHODS="dicejax,reference,func,compiled"; INF_TORCH=""
else
    echo "torch with CUDA not available: timing dicejax only"
    SIM_METHODS="dicejax"; INF_TORCH="--no-torch"
fi

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 secs=$2
    shift 2
    echo "== $name (limit ${secs}s)"
    timeout --signal=INT --kill-after=10 "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name exit ${PIPESTATUS[0]} after $(( $(date +%s) - start ))s total"
}

# more steps per timed run than on the CPU: a GPU step of a small problem takes microseconds
# shellcheck disable=SC2086  # the *_STEPS lists are meant to split
stage bench_simulate_mlp 180 "$PYTHON" benchmarks/bench_simulate.py --device "$DEVICE" \
    --models mlp --nodes "$MLP_NODES" --methods "$SIM_METHODS" \
    --reference-max-nodes 256 --compiled-max-nodes 1024 $MLP_STEPS --repeats "$REPEATS" --tolerance 1e-4 \
    --out "$OUT/bench_simulate_mlp.json"

# shellcheck disable=SC2086
stage bench_simulate_cnn 120 "$PYTHON" benchmarks/bench_simulate.py --device "$DEVICE" \
    --models cnn --nodes "$CNN_NODES" --methods "$SIM_METHODS" \
    --reference-max-nodes 16 --compiled-max-nodes 256 $CNN_STEPS \
    --repeats "$REPEATS" --tolerance 1e-4 --out "$OUT/bench_simulate_cnn.json"

# shellcheck disable=SC2086
stage bench_influence 90 "$PYTHON" benchmarks/bench_influence.py --nodes "$INF_NODES" \
    --hops 1,2,3 --repeats "$REPEATS" --budget 15 $INF_TORCH --out "$OUT/bench_influence.json"

echo "done in $(( $(date +%s) - start ))s; results in $OUT"
ls -l "$OUT"
