#!/usr/bin/env bash
# Whole-process LoRA SFT job, llmtune vs LLaMA-Factory, run alternately (A B A B ...) on the CPU. NOT part of CI.
#
# The job (issue 14): alpaca_en_demo, template default, LoRA rank 8 on all linear layers, batch 4, cutoff_len 512,
# bf16, $STEPS optimizer steps; the wall time of the whole process (start-up, model load, data, training, save)
# and its peak RSS are measured with /usr/bin/time. Both tools train the same Hugging Face folder, converted once
# from the shared GGUF model with transformers.
#
# LLaMA-Factory is installed by this script into its own virtual environment ($WORK/lf-venv, from PyPI; pip
# brings the torch wheel PyPI serves; set PIP_EXTRA_INDEX_URL for another). On a CPU-only torch it needs
# `--use_cpu true` and an importable `torchaudio`, which the script provides as an empty module when missing.
#
#   benchmarks/e2e_vs_llamafactory.sh                    # REPEATS=2 STEPS=6 WORK=/tmp/llmtune_e2e
#   REPEATS=3 LF_VERSION=0.9.5 benchmarks/e2e_vs_llamafactory.sh
#
# Output: a table on stdout and benchmarks/results/e2e_vs_llamafactory.json (medians and every run).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SHARED=${LLMTUNE_SHARED:-$(cd "$REPO/.." && pwd)/shared}
WORK=${WORK:-/tmp/llmtune_e2e}
REPEATS=${REPEATS:-2}
STEPS=${STEPS:-6}
LF_VERSION=${LF_VERSION:-0.9.5}
LLMTUNE_PY=${LLMTUNE_PY:-$REPO/.venv/bin/python}
GGUF=${GGUF:-$SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT_JSON=${OUT_JSON:-$REPO/benchmarks/results/e2e_vs_llamafactory.json}
LF_VENV=$WORK/lf-venv
MODEL=$WORK/model-hf
TIME=/usr/bin/time

[ -f "$GGUF" ] || { echo "model $GGUF not found: set LLMTUNE_SHARED or GGUF" >&2; exit 2; }
[ -x "$TIME" ] || { echo "$TIME (GNU time) is needed for peak RSS" >&2; exit 2; }
mkdir -p "$WORK"

# 1. LLaMA-Factory in its own virtual environment
if [ ! -x "$LF_VENV/bin/llamafactory-cli" ]; then
  python3 -m venv "$LF_VENV"
  "$LF_VENV/bin/pip" install -q --upgrade pip
  "$LF_VENV/bin/pip" install -q "llamafactory==$LF_VERSION" gguf
fi
if ! "$LF_VENV/bin/python" -c "import torchaudio" 2>/dev/null; then
  SITE=$("$LF_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  mkdir -p "$SITE/torchaudio" && : > "$SITE/torchaudio/__init__.py"     # LLaMA-Factory imports it; unused here
fi

# 2. the same Hugging Face model folder for both (dequantized from the GGUF by transformers)
if [ ! -f "$MODEL/config.json" ]; then
  "$LF_VENV/bin/python" - "$GGUF" "$MODEL" <<'PY'
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = Path(sys.argv[1]), sys.argv[2]
AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
PY
fi

COMMON=(--stage sft --do_train true --model_name_or_path "$MODEL" --dataset alpaca_en_demo
        --dataset_dir "$SHARED/data" --template default --finetuning_type lora --lora_rank 8 --lora_target all
        --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --cutoff_len 512 --bf16 true
        --max_steps "$STEPS" --learning_rate 1e-4 --logging_steps 1 --save_strategy no --report_to none
        --overwrite_output_dir true --overwrite_cache true)

run() {  # run NAME I: one timed whole-process job; appends "name seconds peak_kib" to $WORK/runs.txt
  local name=$1 i=$2 out="$WORK/out-$1-$2" log="$WORK/$1-$2.log"
  rm -rf "$out"
  if [ "$name" = llmtune ]; then
    "$TIME" -f "%e %M" -o "$WORK/time.txt" "$LLMTUNE_PY" -m llmtune train "${COMMON[@]}" --output_dir "$out" \
      --data_cache_dir "$WORK/cache-llmtune-$i" > "$log" 2>&1
  else
    "$TIME" -f "%e %M" -o "$WORK/time.txt" "$LF_VENV/bin/llamafactory-cli" train "${COMMON[@]}" --output_dir "$out" \
      --use_cpu true > "$log" 2>&1
  fi
  read -r secs kib < <(tail -n 1 "$WORK/time.txt")
  echo "$name $secs $kib" >> "$WORK/runs.txt"
  echo "  run $i $name: ${secs} s, peak RSS $((kib / 1024)) MiB" >&2
}

: > "$WORK/runs.txt"
for i in $(seq 1 "$REPEATS"); do
  run llmtune "$i"
  run llamafactory "$i"
done

"$LLMTUNE_PY" - "$WORK/runs.txt" "$OUT_JSON" "$STEPS" "$LF_VERSION" <<'PY'
import json, statistics, sys
runs = [l.split() for l in open(sys.argv[1]) if l.strip()]
res = {}
for name, secs, kib in runs:
    res.setdefault(name, []).append({"seconds": float(secs), "peak_rss_mib": int(kib) / 1024})
med = {n: {"seconds": statistics.median(r["seconds"] for r in rs),
           "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs), "runs": len(rs)} for n, rs in res.items()}
a, b = med["llmtune"], med["llamafactory"]
print(f"\nLoRA SFT, alpaca_en_demo, batch 4, cutoff_len 512, bf16, {sys.argv[3]} steps, whole process "
      f"(medians of {a['runs']} alternating runs); LLaMA-Factory {sys.argv[4]}")
print(f"{'tool':13s} | {'seconds':>8s} | {'peak MiB':>8s}")
for n in ("llmtune", "llamafactory"):
    print(f"{n:13s} | {med[n]['seconds']:8.1f} | {med[n]['peak_rss_mib']:8.0f}")
print(f"llmtune is {b['seconds'] / a['seconds']:.2f}x faster, at {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x the peak RSS")
json.dump({"steps": int(sys.argv[3]), "llamafactory_version": sys.argv[4], "medians": med, "runs": res,
           "speedup": b["seconds"] / a["seconds"]}, open(sys.argv[2], "w"), indent=2)
print(f"wrote {sys.argv[2]}")
PY
