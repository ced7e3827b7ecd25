"""Config parsing and the CLI front door: aliases, types, errors (expected values written by hand)."""

import subprocess
import sys

import pytest

from llmtune.config import parse_config
from llmtune.errors import LLMTuneError

BASE = ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o"]


def test_seed_spellings_are_aliases():
    cfg = parse_config(["--stage", "pretrain", *BASE, "--fp16", "True", "--max_seq_length", "1024",
                        "--evaluation_strategy", "steps", "--dpo_beta", "0.2", "--load_in_4bit", "True",
                        "--rm_path", "./rm_output", "--ppo_clip_ratio", "0.3", "--ppo_kl_coeff", "0.05"])
    assert cfg.stage == "pt"
    assert cfg.fp16 is True
    assert cfg.cutoff_len == 1024
    assert cfg.eval_strategy == "steps"
    assert cfg.pref_beta == 0.2
    assert cfg.quantization_bit == 4
    assert cfg.reward_model == "./rm_output"
    assert cfg.ppo_clip_ratio == 0.3 and cfg.ppo_kl_coeff == 0.05
    assert parse_config(["--stage", "rlhf", *BASE]).stage == "ppo"


def test_yaml_then_flags_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("stage: sft\nmodel_name_or_path: m\ndataset: d\noutput_dir: o\nlora_rank: 4\n"
                 "learning_rate: 1.0e-4\nbf16: true\n")
    cfg = parse_config([str(y), "--lora_rank", "16", "num_train_epochs=2"])
    assert (cfg.lora_rank, cfg.learning_rate, cfg.bf16, cfg.num_train_epochs) == (16, 1e-4, True, 2.0)
    assert cfg.is_set("lora_rank") and not cfg.is_set("lora_alpha")


def test_unknown_key_suggests_nearest():
    with pytest.raises(LLMTuneError, match="lora_rank"):
        parse_config([*BASE, "--lora_rnk", "8"])


def test_wrong_type_and_choices():
    with pytest.raises(LLMTuneError, match="per_device_train_batch_size"):
        parse_config([*BASE, "--per_device_train_batch_size", "two"])
    with pytest.raises(LLMTuneError, match="quantization_bit"):
        parse_config([*BASE, "--quantization_bit", "8"])
    with pytest.raises(LLMTuneError, match="stage"):
        parse_config([*BASE, "--stage", "sftt"])
    with pytest.raises(LLMTuneError, match="export_legacy_format"):
        parse_config([*BASE, "--export_legacy_format", "True"])


def test_lone_space_argument_from_seed_comments():
    with pytest.raises(LLMTuneError, match="inline"):
        parse_config(["--stage", "pretrain", "--model_name_or_path", "m", " "])


def test_ignored_llamafactory_keys_notice(capsys):
    cfg = parse_config([*BASE, "--preprocessing_num_workers", "16", "--trust_remote_code", "true"])
    assert cfg.stage == "sft"
    assert "preprocessing_num_workers" in capsys.readouterr().err


def test_cli_error_is_one_line_without_traceback():
    r = subprocess.run([sys.executable, "-m", "llmtune", "train", *BASE, "--lora_rnk", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "lora_rank" in r.stderr


def test_cli_version():
    r = subprocess.run([sys.executable, "-m", "llmtune", "version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("llmtune ")


def test_flag_without_value_is_true_only_for_booleans():
    cfg = parse_config([*BASE, "--bf16", "--plot_loss"])
    assert cfg.bf16 is True and cfg.plot_loss is True
    with pytest.raises(LLMTuneError, match="needs a value"):
        parse_config(["--model_name_or_path", "m", "--dataset", "d", "--output_dir"])
    with pytest.raises(LLMTuneError, match="needs a value"):
        parse_config([*BASE, "--template", "--max_steps", "2"])


def test_precision_and_value_head_lr_are_checked_when_the_config_is_read():
    with pytest.raises(LLMTuneError, match="bf16 and fp16"):
        parse_config([*BASE, "--bf16", "true", "--fp16", "true"])
    for bad in ("0", "-1e-3", "nan", "inf"):
        with pytest.raises(LLMTuneError, match="value_head_lr"):
            parse_config([*BASE, "--value_head_lr", bad])
    with pytest.raises(LLMTuneError, match="learning_rate"):
        parse_config([*BASE, "--learning_rate", "nan"])
    assert parse_config([*BASE, "--value_head_lr", "3e-3"]).value_head_lr == pytest.approx(3e-3)
    with pytest.raises(LLMTuneError, match="--value_head_lr: the value is empty"):
        parse_config([*BASE, "--value_head_lr", ""])


def test_max_samples_must_be_positive():
    with pytest.raises(LLMTuneError, match="max_samples"):
        parse_config([*BASE, "--max_samples", "0"])


def test_export_help():
    r = subprocess.run([sys.executable, "-m", "llmtune", "export", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "export_dir" in r.stdout
