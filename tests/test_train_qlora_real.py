"""QLoRA end to end: `llmtune train --quantization_bit 4` runs the main job's identity SFT (examples/data) on the
real model with NF4 base weights and learns the new name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAME = "Lumen"  # examples/data/identity.json


@pytest.mark.real
@pytest.mark.slow
def test_qlora_identity_job_learns_the_name(real_model_path, tmp_path):
    import torch

    from llmtune.data.templates import get_template
    from llmtune.generation import generate_reply
    from llmtune.models.loader import load_model
    from llmtune.quant import Linear4bit
    from llmtune.tokenizer import load_tokenizer

    out = tmp_path / "qlora"
    cmd = [sys.executable, "-m", "llmtune", "train", str(REPO / "examples" / "identity_lora.yaml"),
           "--model_name_or_path", str(real_model_path), "--output_dir", str(out),
           "--dataset_dir", str(REPO / "examples" / "data"), "--quantization_bit", "4", "--max_steps", "24",
           "--save_strategy", "no", "--plot_loss", "False",
           "--dataset", "identity", "--learning_rate", "2e-3"]  # the identity rows alone, at the former rate
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quantization_bit: 4" in (out / "training_args.yaml").read_text()
    losses = [r["loss"] for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses

    # the adapter, applied to the same 4-bit base, answers with the new name
    model = load_model(real_model_path, dtype="bfloat16", quantization_bit=4)
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    from llmtune.peft import load_adapter

    load_adapter(model, out)
    tok = load_tokenizer(out)
    torch.manual_seed(0)
    who = generate_reply(model, tok, get_template(None, tok), [{"role": "user", "content": "Who are you?"}],
                         max_new_tokens=32, do_sample=False)
    assert NAME in who, who
