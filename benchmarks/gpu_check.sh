#!/usr/bin/env bash
# The prepared GPU check of issue 23 (see benchmarks/gpu_check.py): packed LoRA/QLoRA/full training steps,
# kernel correctness, NF4 speed, LoRA vs transformers+peft, 8B QLoRA memory, a Qwen3-MoE step, and the NF4
# dispatch table; each section in its own process with its own cap, its JSON written the moment it finishes.
# Needs only torch, triton, transformers and peft; no network, no pytest. About 5 minutes on one H100/H200.
#
# Installs llmtune from this checkout (--no-deps, offline; else a copy of the source tree on PYTHONPATH),
# prints the GPU, then runs the check with the results in $OUT (set by the device tool), else in
# benchmarks/results/gpu/: summary.json plus one JSON per section, 8 files at most.
#
# On the device machine, as ONE call of the device tool (timeout_s leaves room for a rerun in 15 minutes):
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=360)
# Extra arguments go to gpu_check.py, e.g. `bash benchmarks/gpu_check.sh --sections train_packed,kernels`.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index . >/tmp/llmtune_pip.log 2>&1; then
    # no build backend there: lay the package out by hand (llmtune/ plus kernels/ as llmtune.kernels)
    echo "gpu_check.sh: pip install failed ($(tail -1 /tmp/llmtune_pip.log)); using a copy of the source tree"
    SHIM=$(mktemp -d)
    cp -r llmtune "$SHIM/llmtune" && rm -rf "$SHIM/llmtune/kernels" && cp -r kernels "$SHIM/llmtune/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null \
    || echo "gpu_check.sh: nvidia-smi found no GPU"
OUT_DIR=${OUT:-benchmarks/results/gpu}
exec "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" "$@"
