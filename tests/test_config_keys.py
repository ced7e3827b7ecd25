"""The typed config: refused settings (issue 15), no side effects, one set of defaults, generated --help (issue 19).

Expected values are written by hand from LLaMA-Factory / Hugging Face / TRL documentation (defaults) and from
the rules in the issues (what must be refused), never taken from the code under test.
"""

import copy
import subprocess
import sys

import pytest

from config_helpers import make_config
from llmtune import cli
from llmtune.config import ALIASES, GROUPS, KEYS, STAGES, TrainConfig, parse_config, validate
from llmtune.errors import LLMTuneError

BASE = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o"}

#: (keys, the key the one error must name, a word of the message); every one would make training a no-op,
#: mean something else, or fail late
REFUSED = [
    ({"lora_alpha": 0}, "lora_alpha", "nothing trains"),
    ({"lora_alpha": -4}, "lora_alpha", "> 0"),
    ({"save_steps": 0}, "save_steps", "save_strategy"),
    ({"save_steps": -5}, "save_steps", "> 0"),
    ({"logging_steps": -1}, "logging_steps", "> 0"),
    ({"logging_steps": 0}, "logging_steps", "> 0"),
    ({"logging_steps": 2.5}, "logging_steps", "fraction of all steps in (0, 1)"),   # HF: < 1 is a fraction
    ({"warmup_ratio": -0.1}, "warmup_ratio", "in [0, 1]"),
    ({"warmup_ratio": 1.5}, "warmup_ratio", "in [0, 1]"),
    ({"warmup_steps": -3}, "warmup_steps", ">= 0"),
    ({"weight_decay": -0.01}, "weight_decay", ">= 0"),
    ({"adam_beta1": 2}, "adam_beta1", "in [0, 1)"),
    ({"adam_beta1": 1}, "adam_beta1", "in [0, 1)"),
    ({"adam_beta2": -0.5}, "adam_beta2", "in [0, 1)"),
    ({"adam_epsilon": -1}, "adam_epsilon", "> 0"),
    ({"adam_epsilon": 0}, "adam_epsilon", "> 0"),
    ({"max_grad_norm": -1}, "max_grad_norm", ">= 0"),
    ({"num_train_epochs": -1}, "num_train_epochs", ">= 0"),
    ({"num_train_epochs": 0}, "num_train_epochs", "trains nothing"),
    ({"do_train": False}, "do_train", "runs nothing"),          # no do_eval/do_predict either: a silent no-op
    ({"lora_dropout": 1.0}, "lora_dropout", "in [0, 1)"),
    ({"lora_dropout": -0.1}, "lora_dropout", "in [0, 1)"),
    ({"val_size": -0.2}, "val_size", ">= 0"),
    ({"val_size": 2.5}, "val_size", "whole number"),
    ({"temperature": 0}, "temperature", "sampling"),
    ({"temperature": -1.0, "do_sample": True}, "temperature", ">= 0"),
    ({"top_p": 0}, "top_p", "in (0, 1]"),
    ({"top_p": 1.2}, "top_p", "in (0, 1]"),
    ({"top_k": -1}, "top_k", ">= 0"),
    ({"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ({"stage": "grpo", "num_generations": 1, "per_device_train_batch_size": 8}, "num_generations", ">= 2"),
    ({"stage": "grpo", "num_generations": 4, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2},
     "num_generations", "multiple of num_generations"),
    ({"stage": "ppo", "max_new_tokens": 0}, "max_new_tokens", ">= 1"),
    ({"learning_rate": float("nan")}, "learning_rate", "finite"),
    ({"learning_rate": "inf"}, "learning_rate", "finite"),
    ({"learning_rate": -1e-4}, "learning_rate", ">= 0"),
    ({"pref_beta": 0}, "pref_beta", "> 0"),
    ({"dpo_label_smoothing": 0.5}, "dpo_label_smoothing", "in [0, 0.5)"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size", ">= 1"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps", ">= 1"),
    ({"cutoff_len": 0}, "cutoff_len", ">= 1"),
    ({"lora_rank": 0}, "lora_rank", ">= 1"),
    ({"max_samples": 0}, "max_samples", ">= 1"),
    ({"eval_steps": 0}, "eval_steps", "> 0"),
    ({"ddp_timeout": 0}, "ddp_timeout", "> 0"),
    ({"export_size": 0}, "export_size", "> 0"),
    ({"value_head_lr": 0}, "value_head_lr", "> 0"),
    ({"ppo_epochs": 0}, "ppo_epochs", ">= 1"),
    ({"ppo_lam": 1.5}, "ppo_lam", "in [0, 1]"),
    ({"epsilon": 0.2, "epsilon_high": 0.1}, "epsilon_high", ">= epsilon"),
    ({"reward_weights": "1,x"}, "reward_weights", "finite numbers"),
    ({"reward_funcs": "a.py:f,b.py:g", "reward_weights": "1"}, "reward_weights", "one weight per function"),
    # allowed values that used to be checked late, by Trainer, lr_lambda, stages_pref, ppo, export, loader
    ({"eval_strategy": "step"}, "eval_strategy", "steps"),
    ({"save_strategy": "always"}, "save_strategy", "no, steps, epoch"),
    ({"lr_scheduler_type": "cosin"}, "lr_scheduler_type", "cosine"),
    ({"pref_loss": "sigmoidd"}, "pref_loss", "sigmoid"),
    ({"reward_model_type": "api"}, "reward_model_type", "lora, full"),
    ({"export_format": "onnx"}, "export_format", "safetensors, gguf"),
    ({"gguf_type": "q5_k"}, "gguf_type", "q4_0"),
    ({"quantization_bit": 8}, "quantization_bit", "4 bits"),
    ({"quantization_type": "int4"}, "quantization_type", "nf4, fp4"),
    ({"infer_dtype": "float8"}, "infer_dtype", "bfloat16"),
    ({"report_to": "tensorboard,neptune"}, "report_to", "wandb"),
    ({"fsdp": "hybrid_shard"}, "fsdp", "full_shard"),
    ({"optim": "paged_adamw_8bit"}, "optim", "adamw_torch"),
    ({"finetuning_type": "qlora"}, "finetuning_type", "lora, freeze, full"),
    ({"stage": "sftt"}, "stage", "pretrain"),
    ({"loss_type": "ppo"}, "loss_type", "dapo"),
    ({"scale_rewards": "sometimes"}, "scale_rewards", "group"),
    ({"nonfinite_policy": "ignore"}, "nonfinite_policy", "stop, skip"),
    ({"export_legacy_format": True}, "export_legacy_format", "safetensors"),
    ({"bf16": True, "fp16": True}, "bf16", "only one"),
]


@pytest.mark.parametrize("keys,key,word", REFUSED, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(REFUSED)])
def test_refused_setting_is_one_error_naming_the_key(keys, key, word):
    given = dict(BASE, **keys)
    before = copy.deepcopy(given)
    with pytest.raises(LLMTuneError) as err:
        parse_config(given, command="train")
    msg = str(err.value)
    assert msg.startswith(key) and word in msg and "\n" not in msg
    assert given == before or keys == {"learning_rate": float("nan")}   # nan != nan; nothing else changed


@pytest.mark.parametrize("keys,key,word", REFUSED[::6], ids=[k for _, k, _ in REFUSED[::6]])
def test_refused_setting_on_the_cli_is_one_line_exit_2(keys, key, word, capsys):
    argv = ["train"] + [w for k, v in dict(BASE, **keys).items() for w in (f"--{k}", str(v))]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llmtune: error: {key}") and err.count("\n") == 1 and word in err


def test_cli_refusal_in_a_subprocess_has_no_traceback():
    r = subprocess.run([sys.executable, "-m", "llmtune", "train", "--model_name_or_path", "m", "--dataset", "d",
                        "--output_dir", "o", "--adam_beta1", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # issue 25: the value is echoed as typed ("2"), no longer as the float it became ("2.0")
    assert r.stderr.strip() == "llmtune: error: adam_beta1: 2 is not allowed; it must be in [0, 1) (use a value " \
                               "such as 0.9)"


def test_settings_at_the_edge_are_accepted():
    cfg = parse_config(dict(BASE, lora_alpha=0.5, warmup_ratio=1.0, adam_beta1=0.0, max_grad_norm=0, val_size=100,
                            temperature=0, do_sample=False, top_p=1.0, save_steps=0, save_strategy="no",
                            stage="grpo", num_generations=4, per_device_train_batch_size=2,
                            gradient_accumulation_steps=2))
    assert (cfg.val_size, cfg.save_steps, cfg.num_generations) == (100.0, 0, 4)
    for only in ("do_eval", "do_predict"):     # evaluation or prediction alone is a run (LLaMA-Factory's use)
        assert not parse_config(dict(BASE, do_train=False, **{only: True}), command="train").do_train


def test_new_keys_defaults_and_aliases():
    """Defaults written by hand from new_keys.md (TRL GRPOConfig names) and LLaMA-Factory."""
    cfg = make_config()
    assert "grpo" in STAGES
    assert (cfg.num_generations, cfg.beta, cfg.epsilon, cfg.epsilon_high, cfg.loss_type) == (8, 0.0, 0.2, None, "dapo")
    assert (cfg.importance_sampling_level, cfg.scale_rewards, cfg.num_iterations) == ("token", "group", 1)
    assert (cfg.mask_truncated_completions, cfg.reward_funcs, cfg.reward_weights) == (False, None, None)
    assert (cfg.torch_compile, cfg.padding_free, cfg.use_kernels, cfg.moe_aux_loss_coef) == (False, True, True, None)
    assert (cfg.nonfinite_policy, cfg.history, cfg.report_to) == ("stop", False, "none")
    assert (cfg.pref_beta, cfg.cutoff_len, cfg.per_device_train_batch_size, cfg.logging_steps) == (0.1, 2048, 1, 10)
    assert make_config(max_completion_length=64).max_new_tokens == 64
    assert make_config(scale_rewards="true").scale_rewards == "group"
    assert make_config(scale_rewards=False).scale_rewards == "none"
    assert make_config(report_to="TensorBoard, wandb").report_to == "tensorboard,wandb"
    assert make_config(infer_dtype="bf16").infer_dtype == "bfloat16"
    assert make_config(fsdp="full_shard,offload").fsdp == "full_shard offload"
    assert make_config(fsdp="false").fsdp is None
    # packing: LLaMA-Factory's rule, true for pt when unset
    assert make_config(stage="pretrain").packing is True and make_config().packing is False
    assert make_config(stage="pt", packing=False).packing is False


def test_every_key_is_described_once_in_a_group():
    for name, f in KEYS.items():
        assert f.metadata["help"] and f.metadata["group"] in GROUPS, name
        assert "\n" not in f.metadata["help"]
    assert all(target in KEYS for target in ALIASES.values())
    assert not set(ALIASES) & set(KEYS)


def test_allowed_values_agree_with_the_modules_that_use_them():
    from llmtune.config import keys
    from llmtune.models.gguf_writer import GGUF_TYPES
    from llmtune.train.wrap import FSDP_TOKENS
    from llmtune.train.stages.pref import PREF_LOSSES

    assert set(keys.PREF_LOSSES) == set(PREF_LOSSES)
    assert set(keys.GGUF_TYPES) == set(GGUF_TYPES)
    assert set(keys.FSDP_TOKENS) == set(FSDP_TOKENS)


# -- no side effects -------------------------------------------------------------------------------------
def test_parse_config_never_changes_its_source():
    given = dict(BASE, stage="pretrain", infer_dtype="bf16", dataset=["a", "b"], report_to="TensorBoard")
    before = copy.deepcopy(given)
    cfg = parse_config(given)
    assert given == before
    assert (cfg.stage, cfg.dataset, cfg.infer_dtype) == ("pt", "a,b", "bfloat16")
    again = parse_config(cfg, lora_rank=4)
    assert again is not cfg and cfg.lora_rank == 8 and again.lora_rank == 4 and again.is_set("lora_rank")
    same = parse_config(cfg)
    assert same is not cfg and same == cfg


def test_validate_does_not_change_its_argument():
    cfg = parse_config(dict(BASE))
    cfg.stage = "pretrain"          # changed after building: validate refuses instead of fixing it
    with pytest.raises(LLMTuneError, match="stage: 'pretrain'"):
        validate(cfg, "train")
    assert cfg.stage == "pretrain"
    ok = parse_config(dict(BASE, stage="rm"))
    before = ok.to_dict()
    validate(ok, "train")
    assert ok.to_dict() == before


def test_replace_rechecks_and_recomputes_derived_keys():
    cfg = make_config(stage="pt")
    assert cfg.packing is True
    assert cfg.replace(stage="sft").packing is False
    assert cfg.replace(stage="sft", packing=True).packing is True
    with pytest.raises(LLMTuneError, match="lora_alpha"):
        cfg.replace(lora_alpha=0)
    with pytest.raises(LLMTuneError, match="lora_rank"):
        cfg.replace(lora_rnak=4)


def test_direct_construction_is_checked_too():
    with pytest.raises(LLMTuneError, match="adam_epsilon"):
        TrainConfig(adam_epsilon=0)
    assert TrainConfig(stage="rlhf", learning_rate="1e-4").stage == "ppo"


# -- bad sources -----------------------------------------------------------------------------------------
def test_a_source_of_another_type_is_a_clear_error():
    import llmtune

    with pytest.raises(LLMTuneError, match="got int 42"):
        parse_config(42)
    with pytest.raises(LLMTuneError, match="got int 42"):
        llmtune.train(42)
    with pytest.raises(LLMTuneError, match="TrainConfig or a dict"):
        from llmtune.train.trainer import as_train_config

        as_train_config(42)


def test_config_file_not_utf8_or_not_yaml_names_the_file(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"stage: sft\ndefault_system: caf\xe9\n")
    with pytest.raises(LLMTuneError, match=r"latin1.yaml: not UTF-8 text \(byte 30: 0xe9\)"):
        parse_config(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage: sft\nlora_rank: [8\nlearning_rate: 1e-4\n")
    with pytest.raises(LLMTuneError, match=r"broken.yaml: line \d+, column \d+: invalid YAML"):
        parse_config([str(broken)])
    js = tmp_path / "c.json"
    js.write_text('{"stage": "sft",}')
    with pytest.raises(LLMTuneError, match=r"c.json: line 1, column 17: invalid JSON"):
        parse_config(str(js))
    assert cli.main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "latin1.yaml" in err and "Traceback" not in err


# -- one set of defaults ---------------------------------------------------------------------------------
def test_trainer_and_llmtune_train_use_the_same_defaults(tmp_path, monkeypatch):
    import llmtune
    from llmtune.train import setup
    from llmtune.train.trainer import Trainer
    from tiny_helpers import tiny_model

    given = {"model_name_or_path": "m", "dataset": "d", "output_dir": str(tmp_path / "o"), "max_steps": 1}
    seen = {}

    class Seen(Exception):
        pass

    def capture(cfg):  # the setup path's step 2 gets the config that llmtune.train built
        seen["cfg"] = cfg
        raise Seen

    monkeypatch.setattr(setup, "prepare_output_dir", capture)
    with pytest.raises(Seen):
        llmtune.train(dict(given))
    rows = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [1, 2, 3]}] * 2
    trainer = Trainer(tiny_model(), dict(given), rows)
    assert trainer.config.to_dict() == seen["cfg"].to_dict()
    # and the loop reads them: LLaMA-Factory/HF defaults written here by hand
    assert (trainer.bs, trainer.ga, trainer.logging_steps, trainer.save_steps, trainer.seed) == (1, 1, 10, 500, 42)
    assert trainer.optimizer.defaults["betas"] == (0.9, 0.999) and trainer.optimizer.defaults["eps"] == 1e-8


def test_fractional_steps_are_a_fraction_of_all_steps(tmp_path):
    """Hugging Face TrainingArguments: logging/save/eval steps below 1 are a ratio of the total steps,
    rounded up (math.ceil(0.25 * 10) = 3; 0.05 * 10 = 0.5 -> 1)."""
    from llmtune.train.trainer import Trainer
    from tiny_helpers import tiny_model

    rows = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [1, 2, 3]}] * 2
    cfg = dict(BASE, output_dir=str(tmp_path / "o"), max_steps=10, logging_steps=0.25, save_steps=0.05, eval_steps=0.5)
    trainer = Trainer(tiny_model(), cfg, rows)
    assert (trainer.logging_steps, trainer.save_steps, trainer.eval_steps) == (3, 1, 5)


# -- help -----------------------------------------------------------------------------------------------
def _help(capsys, *argv):
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def test_train_help_is_grouped_with_descriptions_and_defaults(capsys):
    out = _help(capsys, "train", "--help")
    titles = [GROUPS[g] for g in ("model", "finetuning", "data", "training", "preference", "rl", "generation",
                                  "distributed")]
    positions = [out.index("\n" + t + "\n") for t in titles]
    assert positions == sorted(positions)
    lora = out[out.index(GROUPS["finetuning"]):out.index(GROUPS["data"])]
    assert "--lora_alpha NUMBER" in lora and "[default: 2 x lora_rank]" in lora
    line = next(ln for ln in out.splitlines() if ln.lstrip().startswith("--pref_beta"))
    assert "[default: 0.1]" in line and "(also --dpo_beta)" in line and "beta" in line.split("]")[0]
    stage = next(ln for ln in out.splitlines() if ln.lstrip().startswith("--stage"))
    assert "pt|sft|rm|ppo|dpo|kto|grpo" in stage
    assert GROUPS["export"] not in out and "--export_dir" not in out


def test_help_keyword_filters_by_name_and_description(capsys):
    out = _help(capsys, "train", "--help", "beta")
    keys = {ln.split()[0] for ln in out.splitlines() if ln.startswith("  --")}
    assert {"--adam_beta1", "--adam_beta2", "--pref_beta", "--beta"} <= keys
    assert "--lora_rank" not in keys and "--learning_rate" not in keys
    out = _help(capsys, "train", "-h", "warm-up")        # matches descriptions too
    assert "--warmup_ratio" in out and "--warmup_steps" in out and "--lora_rank" not in out
    out = _help(capsys, "train", "--help", "zzzz")
    assert "No key matches 'zzzz'" in out


def test_export_and_chat_help_show_their_own_keys(capsys):
    out = _help(capsys, "export", "--help")
    assert out.index(GROUPS["export"]) < out.index(GROUPS["model"])
    assert "--export_size" in out and "--gguf_type" in out and "--learning_rate" not in out
    out = _help(capsys, "chat", "--help")
    for k in ("--model_name_or_path", "--temperature", "--top_p", "--history", "--system", "--template"):
        assert k in out
    assert "--learning_rate" not in out and "--export_dir" not in out
    out = _help(capsys, "export", "--help", "shard")
    assert "--export_size" in out and "--fsdp" not in out
