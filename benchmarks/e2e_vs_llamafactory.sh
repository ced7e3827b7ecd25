#!/usr/bin/env bash
# Whole-process LoRA SFT job, llmtune vs LLaMA-Factory, run alternately (A B A B ...) on the CPU. NOT part of CI.
#
# The job (issue 14): alpaca_en_demo, template default, LoRA rank 8 on all linear layers (7 per block), batch 4,
# cutoff_len 512, bf16, $STEPS optimizer steps; the wall time of the whole process (start-up, model load, data,
# training, save) and its peak RSS are measured with /usr/bin/time. Both tools train the same Hugging Face folder,
# converted once from the shared GGUF model with transformers.
#
# Same work in both (checked on a smoke run, see the per-run "tokens"/"loss" columns):
# - same 999 rows, unpacked (LF's packing/neat_packing default off for sft), no val split (val_size 0), the same
#   sampler (seed 42), so step k trains the same 4 rows in both; template "default" gives identical tokens
#   except that LLaMA-Factory also trains the "\n" its template writes after the eos of the last answer (one
#   token per row, +0.6% tokens) and cuts the eos off the 17 rows longer than cutoff_len (llmtune keeps it);
# - LoRA on q,k,v,o,gate,up,down (2,442,240 trainable parameters in both), alpha 16, float32 adapters;
# - bf16: the model folder is saved in bfloat16 (as the SmolLM2 checkpoint is published), so LLaMA-Factory
#   (torch_dtype auto) and llmtune (LoRA + bf16) both hold a bfloat16 base under bfloat16 autocast;
# - LLaMA-Factory turns gradient checkpointing on by default, llmtune does not: LF gets
#   --disable_gradient_checkpointing true so neither recomputes activations.
# The GGUF's eos/pad (<|im_end|>, id 2) are written into the folder: transformers 5.6's GGUF tokenizer converter
# sets eos to <|im_start|> for this model.
#
# LLaMA-Factory is installed by this script into its own virtual environment ($WORK/lf-venv, from PyPI) with a
# pip constraint file pinning torch==$TORCH_VERSION, installed first (a plain install would pull a multi-GB CUDA
# torch; where pip's configuration offers no CPU build, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
# Chosen on 2026-12-02 (Python 3.11): torch 2.13.0+cpu, llamafactory 0.9.5, transformers 5.6.0, peft 0.18.1,
# trl 0.24.0, accelerate 1.11.0, datasets 4.0.0, tokenizers 0.22.2, gguf 0.19.0 (pip's own choice within
# LLaMA-Factory's ranges, torch kept). The torchaudio (2.11.1) and torchvision (0.28.0) wheels pip brings do not
# load with this CPU torch (their compiled ops fail, which breaks transformers' imports): the script removes them
# and gives LLaMA-Factory the empty `torchaudio` module it imports; it also needs `--use_cpu true` on a CPU.
#
#   benchmarks/e2e_vs_llamafactory.sh                    # REPEATS=2 STEPS=6 WORK=/tmp/llmtune_e2e
#   REPEATS=1 STEPS=2 OUT_JSON=/tmp/e2e.json benchmarks/e2e_vs_llamafactory.sh     # smoke run
#   SETUP_ONLY=1 benchmarks/e2e_vs_llamafactory.sh     # only install LLaMA-Factory and convert the model
# The shared inputs are found at ../shared beside the repository, else set LLMTUNE_SHARED (or GGUF).
# llmtune's bytecode is compiled once before the timed runs (python -m compileall on the package that
# $LLMTUNE_PY imports), as pip does when it installs a package: LLaMA-Factory's venv has its bytecode from pip,
# and a source checkout under PYTHONDONTWRITEBYTECODE=1 (set on the development machine) would otherwise
# recompile its ~110 modules in every run (0.15-0.3 s of start-up).
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
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
LLMTUNE_PY=${LLMTUNE_PY:-$REPO/.venv/bin/python}
GGUF=${GGUF:-$SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT_JSON=${OUT_JSON:-$REPO/benchmarks/results/e2e_vs_llamafactory.json}
LF_VENV=$WORK/lf-venv
MODEL=$WORK/model-hf
TIME=/usr/bin/time

[ -f "$GGUF" ] || { echo "model $GGUF not found: set LLMTUNE_SHARED or GGUF" >&2; exit 2; }
[ -d "$SHARED/data" ] || { echo "datasets $SHARED/data not found: set LLMTUNE_SHARED" >&2; exit 2; }
[ -x "$TIME" ] || { echo "$TIME (GNU time) is needed for peak RSS" >&2; exit 2; }
[ -x "$LLMTUNE_PY" ] || { echo "$LLMTUNE_PY not found: set LLMTUNE_PY to a python with llmtune installed" >&2; exit 2; }
mkdir -p "$WORK" "$(dirname "$OUT_JSON")"
# no Hub: both tools read local files only; LLaMA-Factory's datasets cache stays under $WORK
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="$WORK/hf-home" TOKENIZERS_PARALLELISM=false

# 1. LLaMA-Factory in its own virtual environment (a marker file: a half-finished install is redone)
if [ ! -f "$LF_VENV/.llmtune_e2e_ready" ]; then
  rm -rf "$LF_VENV"
  python3 -m venv "$LF_VENV"
  echo "torch==$TORCH_VERSION" > "$WORK/constraints.txt"
  "$LF_VENV/bin/pip" install -q -c "$WORK/constraints.txt" "torch==$TORCH_VERSION"
  "$LF_VENV/bin/pip" install -q -c "$WORK/constraints.txt" "llamafactory==$LF_VERSION" gguf
  for mod in torchvision torchaudio; do   # CUDA builds that cannot load on a CPU torch: remove them
    if ! "$LF_VENV/bin/python" -c "import $mod" >/dev/null 2>&1; then
      "$LF_VENV/bin/pip" uninstall -q -y "$mod"
    fi
  done
  if ! "$LF_VENV/bin/python" -c "import torchaudio" >/dev/null 2>&1; then
    SITE=$("$LF_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    mkdir -p "$SITE/torchaudio" && : > "$SITE/torchaudio/__init__.py"   # LLaMA-Factory imports it; unused here
  fi
  "$LF_VENV/bin/llamafactory-cli" version > /dev/null
  "$LF_VENV/bin/pip" freeze > "$LF_VENV/.llmtune_e2e_ready"
fi

# 2. the same Hugging Face model folder for both: dequantized from the GGUF by transformers, saved in bfloat16,
#    with the GGUF's own bos/eos/pad token ids
if [ ! -f "$MODEL/.llmtune_e2e_ready" ]; then
  rm -rf "$MODEL"
  "$LF_VENV/bin/python" - "$GGUF" "$MODEL" <<'PY'
import sys
from pathlib import Path
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
fields = GGUFReader(str(gguf)).fields
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
for name in ("bos", "eos", "padding"):
    f = fields.get(f"tokenizer.ggml.{name}_token_id")
    if f is None:
        continue
    i, attr = int(f.parts[f.data[0]][0]), name.replace("padding", "pad")
    setattr(tok, f"{attr}_token", tok.convert_ids_to_tokens(i))
    setattr(model.config, f"{attr}_token_id", i)
    setattr(model.generation_config, f"{attr}_token_id", i)
model.to(torch.bfloat16).save_pretrained(out)
tok.save_pretrained(out)
(out / ".llmtune_e2e_ready").write_text(f"eos {tok.eos_token} pad {tok.pad_token}\n")
PY
fi
# SETUP_ONLY=1: stop here (benchmarks/serve.py reuses the venv and the model folder)
[ "${SETUP_ONLY:-0}" = 1 ] && { echo "LF_VENV=$LF_VENV MODEL=$MODEL"; exit 0; }

COMMON=(--stage sft --do_train true --model_name_or_path "$MODEL" --dataset alpaca_en_demo
        --dataset_dir "$SHARED/data" --template default --finetuning_type lora --lora_rank 8 --lora_target all
        --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --cutoff_len 512 --bf16 true
        --max_steps "$STEPS" --learning_rate 1e-4 --logging_steps 1 --save_strategy no --report_to none
        --overwrite_output_dir true --overwrite_cache true)
# LLaMA-Factory only: CPU device, no gradient checkpointing (its default is on, llmtune's off), real-token count.
# LF reads these keys from a config file (JSON text, which is YAML; LF 0.9.5 fails to open .json configs) into
# the same dataclasses (HfArgumentParser.parse_dict): its command-line parser takes include_num_input_tokens_seen
# as a bool, and true counts the padding too.
LF_ONLY=(--use_cpu true --disable_gradient_checkpointing true --include_num_input_tokens_seen non_padding)
lf_config() {  # lf_config OUT_DIR FILE: COMMON + LF_ONLY + output_dir, typed, in FILE
  "$LLMTUNE_PY" - "$2" "${COMMON[@]}" "${LF_ONLY[@]}" --output_dir "$1" <<'PY'
import json, re, sys
argv, cfg = sys.argv[2:], {}
for key, value in zip(argv[::2], argv[1::2]):
    if value in ("true", "false"):
        value = value == "true"
    elif re.fullmatch(r"-?\d+", value):
        value = int(value)
    elif re.fullmatch(r"-?\d*\.?\d+(e-?\d+)?", value):
        value = float(value)
    cfg[key.removeprefix("--")] = value
json.dump(cfg, open(sys.argv[1], "w"), indent=1)
PY
}

run() {  # run NAME I: one timed whole-process job; appends "name seconds peak_kib tokens loss" to $WORK/runs.txt
  local name=$1 i=$2 out="$WORK/out-$1-$2" log="$WORK/$1-$2.log" status=0 tokens loss
  rm -rf "$out"
  if [ "$name" = llmtune ]; then
    "$TIME" -f "%e %M" -o "$WORK/time.txt" "$LLMTUNE_PY" -m llmtune train "${COMMON[@]}" --output_dir "$out" \
      --data_cache_dir "$WORK/cache-llmtune-$i" > "$log" 2>&1 || status=$?
  else
    lf_config "$out" "$WORK/llamafactory-$i.yaml"
    "$TIME" -f "%e %M" -o "$WORK/time.txt" "$LF_VENV/bin/llamafactory-cli" train "$WORK/llamafactory-$i.yaml" \
      > "$log" 2>&1 || status=$?
  fi
  if [ "$status" -ne 0 ]; then echo "$name run $i failed (exit $status); its log: $log" >&2; tail -n 5 "$log" >&2; exit 1; fi
  read -r secs kib < <(tail -n 1 "$WORK/time.txt")
  # real tokens trained and the last step's loss, from each tool's own log
  read -r tokens loss < <("$LLMTUNE_PY" - "$name" "$log" "$out" <<'PY'
import json, re, sys
name, log, out = sys.argv[1:]
if name == "llmtune":
    text = open(log).read()
    t = re.search(r"tokens seen: ([\d,]+)", text)
    rows = [json.loads(l) for l in open(f"{out}/trainer_log.jsonl") if l.strip()]
    print(t.group(1).replace(",", "") if t else "nan", [r for r in rows if "loss" in r][-1]["loss"])
else:
    state = json.load(open(f"{out}/trainer_state.json"))
    steps = [h for h in state["log_history"] if "loss" in h]
    print(state.get("num_input_tokens_seen", "nan"), steps[-1]["loss"])
PY
)
  echo "$name $secs $kib $tokens $loss" >> "$WORK/runs.txt"
  echo "  run $i $name: ${secs} s, peak RSS $((kib / 1024)) MiB, $tokens tokens, last loss $loss" >&2
}

# llmtune's bytecode, once (see the header): what `pip install` leaves; never timed
PKGS=$("$LLMTUNE_PY" -c "import os, llmtune, llmtune.kernels as k
print(*(os.path.dirname(os.path.realpath(m.__file__)) for m in (llmtune, k)))")   # kernels: a symlinked subpackage
"$LLMTUNE_PY" -m compileall -q $PKGS > /dev/null
: > "$WORK/runs.txt"
for i in $(seq 1 "$REPEATS"); do
  run llmtune "$i"
  run llamafactory "$i"
done

"$LLMTUNE_PY" - "$WORK/runs.txt" "$OUT_JSON" "$STEPS" "$LF_VERSION" "$LF_VENV/.llmtune_e2e_ready" <<'PY'
import json, statistics, sys
runs = [l.split() for l in open(sys.argv[1]) if l.strip()]
versions = {l.split("==")[0].lower(): l.strip().split("==")[1] for l in open(sys.argv[5]) if "==" in l}
res = {}
for name, secs, kib, tokens, loss in runs:
    res.setdefault(name, []).append({"seconds": float(secs), "peak_rss_mib": int(kib) / 1024,
                                     "tokens": float(tokens), "last_loss": float(loss)})
med = {n: {"seconds": statistics.median(r["seconds"] for r in rs),
           "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
           "tokens": rs[0]["tokens"], "last_loss": rs[0]["last_loss"], "runs": len(rs)} for n, rs in res.items()}
a, b = med["llmtune"], med["llamafactory"]
print(f"\nLoRA SFT, alpaca_en_demo, batch 4, cutoff_len 512, bf16, {sys.argv[3]} steps, whole process "
      f"(medians of {a['runs']} alternating runs); LLaMA-Factory {sys.argv[4]}")
print(f"{'tool':13s} | {'seconds':>8s} | {'peak MiB':>8s} | {'tokens':>7s} | {'last loss':>9s}")
for n in ("llmtune", "llamafactory"):
    m = med[n]
    print(f"{n:13s} | {m['seconds']:8.1f} | {m['peak_rss_mib']:8.0f} | {m['tokens']:7.0f} | {m['last_loss']:9.4f}")
print(f"llmtune is {b['seconds'] / a['seconds']:.2f}x faster, at {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x the peak RSS "
      f"(LLaMA-Factory trains {b['tokens'] / a['tokens'] - 1:+.1%} tokens: the \"\\n\" after each last eos)")
json.dump({"steps": int(sys.argv[3]), "llamafactory_version": sys.argv[4],
           "lf_venv": {k: versions.get(k) for k in ("torch", "transformers", "peft", "trl", "accelerate", "datasets")},
           "medians": med, "runs": res, "speedup": b["seconds"] / a["seconds"]}, open(sys.argv[2], "w"), indent=2)
print(f"wrote {sys.argv[2]}")
PY
