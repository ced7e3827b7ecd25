"""Tiny inputs for the reliability tests: a random model folder with a word-level tokenizer and a ChatML
template, a small sft dataset, a trained LoRA adapter; helpers to run the CLI in-process and hash folders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

WORDS = ("what is the color of sky sea grass snow sun blue green white yellow name your my i am a bot called "
         "tiny made by lab hello hi how are you fine thanks").split()
CHATML = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
REPO = Path(__file__).resolve().parents[1]


def make_model_folder(d: Path, max_positions: int = 256, chat_template: bool = True) -> Path:
    """A 2-layer random Llama folder (model.safetensors, config.json, tokenizer files; with a chat template
    unless ``chat_template`` is False)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llmtune.models import ModelConfig, Transformer

    d.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + ["user", "assistant", "system"] + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(d / "tokenizer.json"))
    tok_cfg = {"eos_token": "<|im_end|>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if chat_template:
        tok_cfg["chat_template"] = CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=3,
                      max_position_embeddings=max_positions)
    model = Transformer(cfg)
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return d


def make_data_dir(d: Path) -> Path:
    """``toy`` (alpaca json, 24 rows), ``toy_text`` (pt txt) in ``dataset_info.json``."""
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for thing, color in (("sky", "blue"), ("sea", "blue"), ("grass", "green"), ("snow", "white"), ("sun", "yellow")):
        rows.append({"instruction": f"what is the color of {thing}", "input": "", "output": f"{color}"})
    rows += [{"instruction": "what is your name", "input": "", "output": "my name is tiny bot made by lab"},
             {"instruction": "hello", "input": "", "output": "hi i am tiny bot"},
             {"instruction": "how are you", "input": "", "output": "fine thanks"}]
    (d / "toy.json").write_text(json.dumps(rows * 3))
    (d / "toy.txt").write_text("\n".join(f"the color of {w} is blue" for w in WORDS) + "\n")
    (d / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "toy.json"},
                                                     "toy_text": {"file_name": "toy.txt", "columns": {"prompt": "text"}}}))
    return d


def train_args(model, data, out, **kw) -> list[str]:
    """CLI words of a short LoRA sft run."""
    c = dict(stage="sft", model_name_or_path=str(model), dataset="toy", dataset_dir=str(data), template="chatml",
             finetuning_type="lora", lora_rank=4, output_dir=str(out), cutoff_len=32, per_device_train_batch_size=4,
             learning_rate=1e-2, max_steps=4, logging_steps=1, save_steps=1000, report_to="none", seed=1,
             overwrite_cache=True, disable_tqdm=True)
    c.update(kw)
    words = ["train"]
    for k, v in c.items():
        if v is not None:
            words += [f"--{k}", str(v)]
    return words


def tree_hash(folder: Path) -> dict[str, str]:
    """``{relative path: sha256 or 'dir'}`` of everything under ``folder`` (``{}`` when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    env.pop("LLMTUNE_DEBUG", None)
    return env


def run_subprocess(args: list[str], stdin: bytes | None = None, timeout: float = 300, cwd=None):
    """``python -m llmtune <args>`` in a subprocess: ``CompletedProcess`` with bytes stdout/stderr."""
    return subprocess.run([sys.executable, "-m", "llmtune", *args], input=stdin, capture_output=True,
                          timeout=timeout, env=cli_env(), cwd=cwd)
