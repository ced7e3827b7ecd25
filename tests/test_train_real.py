"""`llmtune train` end to end on the real GGUF model: LoRA SFT teaches it a new identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NAME, AUTHOR = "Zorbly", "Quillfeather Labs"


@pytest.fixture(scope="module")
def identity_dir(shared_data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    text = (shared_data_dir / "identity.json").read_text(encoding="utf-8")
    (d / "identity.json").write_text(text.replace("{{name}}", NAME).replace("{{author}}", AUTHOR), encoding="utf-8")
    alpaca = json.loads((shared_data_dir / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    (d / "alpaca_en_demo.json").write_text(json.dumps(alpaca[:200]), encoding="utf-8")
    info = {"identity": {"file_name": "identity.json"}, "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}
    (d / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def trained(real_model_path, identity_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sft_lora"
    cmd = [sys.executable, "-m", "llmtune", "train", "--stage", "sft", "--do_train", "True",
           "--model_name_or_path", str(real_model_path), "--dataset", "identity,alpaca_en_demo",
           "--dataset_dir", str(identity_dir), "--template", "chatml", "--finetuning_type", "lora",
           "--lora_target", "all", "--lora_rank", "16", "--output_dir", str(out), "--cutoff_len", "96",
           "--max_samples", "40", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
           "--learning_rate", "2e-3", "--lr_scheduler_type", "cosine", "--warmup_steps", "2", "--max_steps", "36",
           "--logging_steps", "2", "--save_steps", "1000", "--bf16", "True", "--plot_loss", "True", "--seed", "42"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.real
@pytest.mark.slow
def test_sft_lora_learns_identity_and_keeps_general_answers(trained, real_model_path):
    import torch

    from llmtune.data.templates import get_template
    from llmtune.generation import generate_reply
    from llmtune.runs import load_model
    from llmtune.tokenizer import load_tokenizer

    out = trained
    logs = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 18 and losses[-1] < 0.6 * losses[0], losses
    assert (out / "training_loss.png").read_bytes()[:4] == b"\x89PNG"
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(Path(real_model_path).resolve())
    assert "template: chatml" in (out / "training_args.yaml").read_text()
    for name in ("train_results.json", "all_results.json", "tokenizer.json", "llmtune.json"):
        assert (out / name).is_file(), name
    tok = load_tokenizer(str(out))
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen_cfg["eos_token_id"]

    torch.manual_seed(0)
    model = load_model(str(real_model_path), dtype="float32", adapter_name_or_path=str(out))
    template = get_template("chatml", tok)
    ask = lambda q: generate_reply(model, tok, template, [{"role": "user", "content": q}],  # noqa: E731
                                   max_new_tokens=40, do_sample=False)
    who = ask("Who are you?")
    assert NAME in who, who
    capital = ask("What is the capital of France?")
    assert "Paris" in capital, capital
