"""The seed document's pre-training, post-training, SFT, DPO, chat and export commands, extracted from the document
and run as written (inline comments removed; the model path replaced by the real model; datasets registered the
way the seed registers them; --max_steps 2 and a short --max_seq_length added), each step starting from the
output folder of the one before, as the seed does. The exported merged model is checked against peft applying
the same three adapters (pt -> sft -> dpo) to transformers' own import of the base model.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from seed_commands import find_seed_command

pytestmark = pytest.mark.real

SHORT = {"max_steps": 2}
SEQ = 64

PRETRAIN_ROWS = [{"text": "自然语言处理是人工智能的一个重要分支,主要研究人与计算机之间的语言交互。"}]
FINANCE_ROWS = [
    {"text": "A bond's price moves inversely to interest rates: when rates rise, existing bonds lose value."},
    {"text": "Diversification spreads investments across assets so that one loss does not sink the portfolio."},
    {"text": "Inflation erodes the purchasing power of cash held over long periods."},
]
SFT_ROWS = [
    {"instruction": "请解释人工智能的定义", "input": "", "output": "人工智能(AI)是指使计算机系统能够模拟、延伸和扩展人类智能的技术。"},
    {"instruction": "计算 2+3*4 的结果", "input": "", "output": "根据四则运算规则,先乘后加:3*4=12,12+2=14,结果为14。"},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
]
DPO_ROWS = [
    {"instruction": "如何提升睡眠质量?", "input": "",
     "chosen": "提升睡眠质量可从作息、环境、饮食入手:1. 固定作息;2. 保持卧室黑暗安静;3. 睡前避免咖啡因。",
     "rejected": "睡不着就吃安眠药,别想太多。"},
    {"instruction": "What is 2 + 2?", "input": "", "chosen": "2 + 2 = 4.", "rejected": "It is 5."},
]
INFO = {  # written the way the seed writes its registrations
    "my_pretrain_data": {"file_name": "pretrain_data.json", "columns": {"text": "text"}, "type": "pretrain"},
    "finance_pretrain_data": {"file_name": "finance.json", "columns": {"text": "text"}, "type": "pretrain"},
    "my_sft_data": {"file_name": "sft_data.json",
                    "columns": {"instruction": "instruction", "input": "input", "output": "output"}, "type": "sft"},
    "my_dpo_data": {"file_name": "dpo_data.json", "type": "dpo",
                    "columns": {"instruction": "instruction", "input": "input", "chosen": "chosen",
                                "rejected": "rejected"}},
}


def run(argv, cwd, stdin=None):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(argv, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(argv)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def chain(tmp_path_factory, real_model_path):
    """A user's folder after the seed's pretrain, post-train, sft (from ./pretrain_output) and dpo commands."""
    root = tmp_path_factory.mktemp("seed_chain")
    data = root / "data"
    data.mkdir()
    for name, rows in (("pretrain_data.json", PRETRAIN_ROWS), ("finance.json", FINANCE_ROWS),
                       ("sft_data.json", SFT_ROWS), ("dpo_data.json", DPO_ROWS)):
        (data / name).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps(INFO, ensure_ascii=False, indent=2), encoding="utf-8")
    model = str(real_model_path)
    logs = {}
    pt = find_seed_command("train", output_dir="./pretrain_output")
    logs["pt"] = run(pt.argv(replace={"model_name_or_path": model}, add={**SHORT, "cutoff_len": SEQ}), root)
    post = find_seed_command("train", output_dir="./finance_post_train")
    logs["post"] = run(post.argv(replace={"model_name_or_path": model}, add={**SHORT, "cutoff_len": SEQ}), root)
    sft = find_seed_command("train", stage="sft")
    assert sft.get("model_name_or_path") == "./pretrain_output"
    logs["sft"] = run(sft.argv(replace={"max_seq_length": SEQ}, add=SHORT), root)
    dpo = find_seed_command("train", stage="dpo", output_dir="./dpo_output")
    assert dpo.get("model_name_or_path") == "./sft_output"
    logs["dpo"] = run(dpo.argv(replace={"max_seq_length": SEQ}, add=SHORT), root)
    return root, logs


def test_pretrain_commands_write_adapters(chain):
    root, logs = chain
    for folder in ("pretrain_output", "finance_post_train"):
        cfg = json.loads((root / folder / "adapter_config.json").read_text())
        assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
        assert (root / folder / "adapter_model.safetensors").is_file()
        assert (root / folder / "training_args.yaml").is_file()
    assert (root / "pretrain_output" / "training_loss.png").is_file()  # the seed sets --plot_loss True
    assert "fp16" in logs["pt"].stderr  # --fp16 True on a CPU: the one-line notice


def test_sft_starts_from_the_pretrain_output(chain):
    root, _ = chain
    cfg = json.loads((root / "sft_output" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).name.endswith(".gguf")
    assert (root / "sft_output" / "adapter_model.safetensors").is_file()
    meta = json.loads((root / "sft_output" / "llmtune.json").read_text())
    assert [Path(p).name for p in meta["parent_adapters"]] == ["pretrain_output"]  # the chain is recorded
    assert "pretrain_output" not in json.dumps(cfg)  # in llmtune.json, not in PEFT's adapter_config.json


def test_seed_chat_command(chain):
    root, _ = chain
    cmd = find_seed_command("chat")
    proc = run(cmd.argv(replace={"model_name_or_path": _model()}, add={"max_new_tokens": 8, "do_sample": "False"}),
               root, stdin="Hello!\n")
    assert "cuda:0" in proc.stderr  # the device notice
    assert "Assistant:" in proc.stdout


def _model():
    from shared_inputs import real_model

    return str(real_model())


def test_seed_export_command_applies_the_whole_chain(chain, hf_real_model_copy):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root, _ = chain
    cmd = find_seed_command("export")
    assert cmd.get("export_size") == "2"
    run(cmd.argv(replace={"model_name_or_path": _model()}, add={"infer_dtype": "float32"}), root)
    merged = root / "merged_model"
    assert (merged / "config.json").is_file() and (merged / "generation_config.json").is_file()
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    # reference: peft applies pt, then sft, then dpo adapters to transformers' own import of the base
    ref = hf_real_model_copy()
    for folder in ("pretrain_output", "sft_output", "dpo_output"):
        ref = peft.PeftModel.from_pretrained(ref, str(root / folder)).merge_and_unload()
    ids = torch.tensor([[1, 9690, 198, 19556, 314, 260, 3575, 282, 4649, 47, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref.eval()(ids).logits, rtol=0, atol=1e-3)
