"""The run summary (llmtune/train/summary.py): its lines against hand-computed values, and a real run prints them."""

from __future__ import annotations

import contextlib
import json
import io

from test_train_run import base_cfg, data_dir, tiny_folder  # noqa: F401  (fixtures)

from llmtune.train import summary


def test_start_lines_hand_computed():
    # 4,884,480 of 139,399,488 trainable: 4884480 / 139399488 = 0.035039...  -> 3.504%
    lines = summary.format_start("m.gguf", 4_884_480, 139_399_488, 1200, 300, "bf16", "cpu", "sft", "lora")
    assert lines == ["***** llmtune train: sft lora *****",
                     "  model: m.gguf",
                     "  trainable parameters: 4,884,480 (4.88M) of 139,399,488 (139M) (3.504%)",
                     "  examples: 1,200   steps: 300",
                     "  precision: bf16   device: cpu"]


def test_end_lines_hand_computed():
    # 12,345 tokens in 61.5 s -> 200.7 tokens/s; 61.5 s -> 1m 02s (rounded); 1.5 * 2**30 bytes -> 1.5 GiB
    lines = summary.format_end(0.123456, 96, 12_345, 61.5, 1.5 * 2 ** 30, "runs/x",
                               [("adapter_model.safetensors", "adapter"), ("training_loss.png", "plot"),
                                ("trainer_log.jsonl", "log")], "process RSS")
    assert lines == ["***** llmtune train: done *****",
                     "  final loss: 0.1235",
                     "  examples seen: 96   tokens seen: 12,345",
                     "  time: 1m 02s   tokens/s: 200.7",
                     "  peak memory: 1.5 GiB (process RSS)",
                     "  saved to runs/x: adapter adapter_model.safetensors, plot training_loss.png, "
                     "log trainer_log.jsonl"]
    unknown = summary.format_end(None, 0, None, 0.0, None, "o", [])
    assert unknown[1] == "  final loss: n/a" and unknown[3] == "  time: 0.0s   tokens/s: n/a"
    assert unknown[4] == "  peak memory: n/a" and unknown[5] == "  saved to o: nothing"
    # resumed: 12,345 tokens in all, 4,000 of them in this session's 20 s -> 200.0 tokens/s
    resumed = summary.format_end(0.5, 96, 12_345, 20.0, None, "o", [], session_tokens=4_000)
    assert resumed[2] == "  examples seen: 96   tokens seen: 12,345" and resumed[3] == "  time: 20.0s   tokens/s: 200.0"


def test_precision_is_the_one_trained_in():
    """fp16 on a CPU trains under bfloat16 autocast (or float32): the summary names what runs, not the flag."""
    import types

    import torch

    cfg = types.SimpleNamespace(bf16=False, fp16=True)
    assert summary._precision(cfg, types.SimpleNamespace(amp_dtype=torch.bfloat16)) == "bf16 (fp16 requested)"
    assert summary._precision(cfg, types.SimpleNamespace(amp_dtype=None)) == "fp32 (fp16 requested)"
    assert summary._precision(cfg, types.SimpleNamespace(amp_dtype=torch.float16)) == "fp16"   # CUDA
    assert summary._precision(types.SimpleNamespace(bf16=True, fp16=False),
                              types.SimpleNamespace(amp_dtype=torch.bfloat16)) == "bf16"
    assert summary._precision(cfg) == "fp16"     # no trainer: the flag as given


def test_units():
    assert summary.format_duration(3723) == "1h 02m 03s"
    assert summary.format_bytes(300 * 2 ** 20) == "300 MiB" and summary.format_bytes(512) == "512 B"
    assert summary.format_count(9999) == "9,999" and summary.format_count(2_500_000_000) == "2,500,000,000 (2.5B)"


def test_a_run_prints_both_summaries(tiny_folder, data_dir, tmp_path):  # noqa: F811
    import torch

    import llmtune

    out = tmp_path / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = llmtune.train(base_cfg(tiny_folder, data_dir, out, plot_loss=True))
    text = buf.getvalue()
    assert "***** llmtune train: sft lora *****" in text and "***** llmtune train: done *****" in text
    # trainable = the LoRA A/B matrices: counted here independently from the saved adapter's tensors
    from safetensors.torch import load_file

    n_lora = sum(t.numel() for t in load_file(str(out / "adapter_model.safetensors")).values())
    assert f"trainable parameters: {n_lora:,}" in text
    assert "examples: 24   steps: 4" in text  # 8 rows x 3 in the toy set; max_steps 4
    assert "examples seen: 16" in text  # 4 steps x batch 4 (4/6 of an epoch of 24 rows)
    assert f"final loss: {json.loads((out / 'trainer_log.jsonl').read_text().splitlines()[-1])['loss']:.4f}" in text
    assert f"saved to {out}: adapter adapter_model.safetensors, plot training_loss.png, log trainer_log.jsonl" in text
    assert res["train_runtime"] > 0 and torch.isfinite(torch.tensor(res["train_loss"]))


def test_ppo_prints_both_summaries(tiny_folder, data_dir, tmp_path):  # noqa: F811
    from llmtune.train.ppo import train_ppo

    out = tmp_path / "ppo"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        train_ppo(base_cfg(tiny_folder, data_dir, out, stage="ppo", max_steps=1, max_new_tokens=4,
                           per_device_train_batch_size=2),
                  reward_fn=lambda prompts, responses: [float(len(r)) for r in responses])
    text = buf.getvalue()
    assert "***** llmtune train: ppo lora *****" in text and "***** llmtune train: done *****" in text
    assert "steps: 1" in text and "examples seen: 2" in text  # one step of a rollout of 2 prompts
    assert f"saved to {out}: adapter adapter_model.safetensors, value head value_head.safetensors" in text


def test_examples_seen_counts_a_short_last_batch(tiny_folder, data_dir, tmp_path):  # noqa: F811
    import llmtune

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # 24 rows in batches of 5: 5 steps, the last of 4 rows
        llmtune.train(base_cfg(tiny_folder, data_dir, tmp_path / "o", max_steps=-1, num_train_epochs=1,
                               per_device_train_batch_size=5))
    text = buf.getvalue()
    assert "examples: 24   steps: 5" in text and "examples seen: 24 " in text


def test_examples_seen_is_counted_not_estimated(tiny_folder, data_dir, tmp_path):  # noqa: F811
    """24 rows in batches of 5 are steps of 5, 5, 5, 5, 4 rows: 4 steps trained 20 rows (an estimate from the
    epoch fraction, 4/5 x 24, says 19); the count is kept in the checkpoint's trainer state."""
    import llmtune

    buf = io.StringIO()
    out = tmp_path / "o"
    with contextlib.redirect_stdout(buf):
        llmtune.train(base_cfg(tiny_folder, data_dir, out, max_steps=4, per_device_train_batch_size=5,
                               save_steps=3))
    assert "examples seen: 20 " in buf.getvalue()
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["examples_seen"] == 15
