"""The seed document's RM, DPO and knowledge-mix ("KTO") commands, extracted from the document and run as
written (inline comments removed; model path and datasets replaced; --max_steps 2 and a short
--max_seq_length), from an SFT output folder made by the seed's own SFT command on the real model, with the
datasets registered the way the seed registers them (its "type" keys and columns)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from config_helpers import make_config
from cli_helpers import run_cli as run_seed
from seed_commands import find_seed_command

pytestmark = pytest.mark.real

SHORT = {"max_steps": 2}
SEQ = 64

# the seed's data formats, a few rows each (the seed's own example rows first)
RM_ROWS = [
    {"instruction": "推荐一本入门级的Python书籍", "input": "",
     "output": ["《Python编程:从入门到实践》适合新手,案例丰富。", "Python入门可以看《Head First Python》,趣味性强。",
                "随便找本Python书就行。"]},
    {"instruction": "How do I boil an egg?", "input": "",
     "output": ["Put it in boiling water for 7 to 9 minutes, then cool it in cold water.", "Boil it.", "Fry it."]},
]
DPO_ROWS = [
    {"instruction": "如何提升睡眠质量?", "input": "",
     "chosen": "提升睡眠质量可从作息、环境、饮食入手:1. 固定作息;2. 保持卧室黑暗安静;3. 睡前避免咖啡因。",
     "rejected": "睡不着就吃安眠药,别想太多。"},
    {"instruction": "What is 2 + 2?", "input": "", "chosen": "2 + 2 = 4.", "rejected": "It is 5."},
    {"instruction": "Name a primary color.", "input": "", "chosen": "Red is a primary color.", "rejected": "Green tea."},
    {"instruction": "Say hello politely.", "input": "", "chosen": "Hello, nice to meet you!", "rejected": "What?"},
]
SFT_ROWS = [
    {"instruction": "请解释人工智能的定义", "input": "", "output": "人工智能(AI)是指使计算机系统能够模拟、延伸和扩展人类智能的技术。"},
    {"instruction": "计算 2+3*4 的结果", "input": "", "output": "根据四则运算规则,先乘后加:3*4=12,12+2=14,结果为14。"},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Translate 'thank you' to French.", "input": "", "output": "Merci."},
]
KNOWLEDGE_ROWS = [
    {"instruction": "地球半径是多少?", "output": "地球平均半径约6371千米"},
    {"instruction": "What is the boiling point of water at sea level?", "output": "100 degrees Celsius."},
    {"instruction": "How many continents are there?", "output": "Seven."},
]
ALPACA_COLUMNS = {"instruction": "instruction", "input": "input", "output": "output"}
INFO = {
    "my_sft_data": {"file_name": "sft_data.json", "columns": ALPACA_COLUMNS, "type": "sft"},
    "my_rm_data": {"file_name": "rm_data.json", "columns": ALPACA_COLUMNS, "type": "rm"},
    "my_dpo_data": {"file_name": "dpo_data.json", "type": "dpo",
                    "columns": {"instruction": "instruction", "input": "input", "chosen": "chosen",
                                "rejected": "rejected"}},
    "my_knowledge_data": {"file_name": "knowledge_data.json", "columns": {"instruction": "instruction",
                                                                          "output": "output"}, "type": "sft"},
}


def log_entries(folder):
    return [json.loads(line) for line in (Path(folder) / "trainer_log.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, real_model_path):
    """A user's folder: data/ registered as the seed does, and ./sft_output from the seed's SFT command."""
    root = tmp_path_factory.mktemp("seed_pref")
    data = root / "data"
    data.mkdir()
    for name, rows in (("sft_data.json", SFT_ROWS), ("rm_data.json", RM_ROWS), ("dpo_data.json", DPO_ROWS),
                       ("knowledge_data.json", KNOWLEDGE_ROWS)):
        (data / name).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps(INFO, ensure_ascii=False, indent=2), encoding="utf-8")
    sft = find_seed_command("train", stage="sft")
    run_seed(sft.argv(replace={"model_name_or_path": str(real_model_path), "max_seq_length": SEQ},
                      add=SHORT), root)
    assert (root / "sft_output" / "adapter_model.safetensors").is_file()
    return root


def test_seed_rm_command_trains_the_value_head_alone(workdir, real_model_path):
    cmd = find_seed_command("train", stage="rm")
    assert cmd.get("lora_target") == "value" and cmd.get("model_name_or_path") == "./sft_output"
    proc = run_seed(cmd.argv(replace={"max_seq_length": SEQ}, add=SHORT), workdir)
    err = proc.stderr
    notes = [ln for ln in err.splitlines() if "lora_target value" in ln]
    assert len(notes) == 1 and "value head alone" in notes[0]
    assert all(m in notes[0] for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert "fp16 on a CPU" in err and "bfloat16" in err
    out = workdir / "rm_output"
    assert (out / "value_head.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    for f in ("training_args.yaml", "tokenizer.json", "llmtune.json", "trainer_log.jsonl"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "llmtune.json").read_text())
    assert meta["base_model_name_or_path"] == str(Path(real_model_path).resolve())
    assert meta["parent_adapters"] == [str((workdir / "sft_output").resolve())]
    assert meta["stage"] == "rm"
    entries = [e for e in log_entries(out) if "loss" in e]
    assert len(entries) >= 1 and all("accuracy" in e for e in entries)

    # PPO's view of it: the SFT model (base + sft adapter) with the trained head on top, built the way a PPO
    # run builds its reward model (llmtune.train.ppo.load_reward_model on the policy)
    from safetensors.torch import load_file

    from llmtune.peft import apply_lora
    from llmtune.runs import load_model
    from llmtune.train.ppo import load_reward_model

    policy = load_model(workdir / "sft_output", dtype=torch.float32)
    head = load_file(str(out / "value_head.safetensors"))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        h = policy(ids, attention_mask=mask)[0, -1]
    apply_lora(policy, lora_rank=4, lora_target="q_proj")  # the PPO policy's own trainable adapter
    cfg = make_config(reward_model=str(out), reward_model_type="lora", finetuning_type="lora")
    rm = load_reward_model(policy, cfg, policy.adapter_chain.base, policy.adapter_chain.parents)
    assert rm.kind == "base"
    got = rm.score(policy, ids, mask, prompt_len=1)  # the value head reads the last token's hidden state
    want = h @ head["v_head.summary.weight"][0] + head["v_head.summary.bias"][0]
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)


def test_seed_dpo_command(workdir):
    cmd = find_seed_command("train", stage="dpo", output_dir="./dpo_output")
    assert cmd.get("dpo_beta") == "0.1"
    run_seed(cmd.argv(replace={"max_seq_length": SEQ}, add=SHORT), workdir)
    out = workdir / "dpo_output"
    assert (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    args = (out / "training_args.yaml").read_text()
    assert "pref_beta: 0.1" in args and "stage: dpo" in args
    entries = [e for e in log_entries(out) if "loss" in e]
    assert entries and all(k in entries[-1] for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                                      "rewards/margins", "logps/chosen", "logps/rejected"))


def test_seed_knowledge_mix_command(workdir):
    """`--stage dpo --kto_alpha 0.5 --dataset my_dpo_data,my_knowledge_data`: DPO + 0.5 x NLL of the SFT rows."""
    cmd = find_seed_command("train", output_dir="./kto_output")
    assert cmd.get("stage") == "dpo" and cmd.get("kto_alpha") == "0.5"
    assert cmd.get("dataset") == "my_dpo_data,my_knowledge_data"
    run_seed(cmd.argv(replace={"max_seq_length": SEQ}, add=SHORT), workdir)
    out = workdir / "kto_output"
    assert (out / "adapter_model.safetensors").is_file()
    entries = [e for e in log_entries(out) if "loss" in e]
    assert entries and "sft_loss" in entries[-1] and "rewards/accuracies" in entries[-1]
    assert 0 < entries[-1]["sft_loss"] < 20


def test_seed_commands_are_parsed_from_the_document():
    from seed_commands import clean_lines, seed_commands

    cmds = seed_commands()
    stages = [c.get("stage") for c in cmds if c.subcommand == "train"]
    assert stages == ["pretrain", "pretrain", "sft", "rm", "rlhf", "dpo", "dpo"]
    assert [c.subcommand for c in cmds if c.subcommand != "train"] == ["version", "chat", "export"]
    assert all(" # " not in c.text and "\\" not in c.text for c in cmds)
    assert clean_lines(["a \\  # x", "--b 1 \\  # y", "--c 2  # z"]) == "a --b 1 --c 2"
    argv = find_seed_command("train", stage="rm").argv(add={"max_steps": 2})
    assert argv[:4] == [sys.executable, "-m", "llmtune", "train"] and argv[-2:] == ["--max_steps", "2"]
