#!/usr/bin/env bash
# The oldest torch pyproject.toml supports, on the CPU: a smoke subset of the tests in a throwaway venv that
# sees this machine's other packages (llmtune, transformers, pytest ...). torch's Linux wheels on PyPI are
# CUDA builds that import only with their nvidia-* wheels: about 3.8 GB in all. Measured on 2 cores shared
# with other work: 6.4 min in all (download and install about 3.9 min, tests 2.5 min); the download alone
# took 50 s and the install 100 s at quieter moments. Fails loudly (non-zero).
# Run by .ci/run after the main suite (OLDEST_TORCH=0 skips it, with a line saying so); alone:
#   bash .ci/oldest_torch.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
FLOOR=$("$PY" -c 'import re; print(re.search(r"\"torch>=([0-9.]+)", open("pyproject.toml").read()).group(1))')
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m venv --system-site-packages "$WORK/venv"
echo "CI: installing torch~=$FLOOR.0 (the oldest supported) into $WORK/venv"
"$WORK/venv/bin/pip" install --quiet --no-compile "torch~=$FLOOR.0"
"$WORK/venv/bin/python" -c "import sys, torch; v = torch.__version__; print('CI: oldest torch', v); sys.exit(not v.startswith('$FLOOR.'))"
# the torch-version contract, packed attention, fp16 loss scaling, MoE, training and resume, DDP and FSDP on gloo
# (FSDP with QLoRA needs torch >= 2.12: llmtune refuses it below, tests/test_torch_api.py)
export PYTHONPATH="${PYTHONPATH:-}"
"$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_torch_api.py tests/test_fp16_loss_scale.py tests/test_moe_grouped_cache.py tests/test_padding_free.py \
  tests/test_trainer.py::test_resume_gives_the_same_losses_as_an_uninterrupted_run \
  tests/test_trainer.py::test_gradient_accumulation_equals_big_batch_and_hand_gradient \
  tests/test_distributed.py::test_ddp_two_ranks_give_the_gradient_of_one_big_batch \
  tests/test_distributed.py::test_fsdp_full_finetuning_matches_single_process_and_resumes \
  tests/test_distributed_fsdp_lora.py::test_fsdp_lora_matches_one_process_and_resumes
