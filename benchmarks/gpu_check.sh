#!/usr/bin/env bash
# The prepared GPU check of issue 18 (see benchmarks/gpu_check.py): compiled kernel tests, NF4 speed, and
# LoRA/QLoRA training steps against transformers+peft. Needs only torch, triton, transformers and peft; no
# Hub access. Installs llmtune from this checkout (--no-deps, offline), then runs the check; under 5 minutes
# on one H200. Results: benchmarks/results/gpu.json, gpu.md and the table on stdout. Extra arguments go to
# gpu_check.py, e.g. `bash benchmarks/gpu_check.sh --copy-to "$OUT"` to copy the results into a folder.
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
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" benchmarks/gpu_check.py "$@"
