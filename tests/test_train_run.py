"""run_train end to end on a tiny model folder with a tiny word-level tokenizer (no real inputs needed)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from reliability_helpers import make_data_dir, make_model_folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("tiny_model"), max_positions=4096, chat_template=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"))


def base_cfg(model, data, out, **kw):
    c = dict(stage="sft", model_name_or_path=str(model), dataset="toy", dataset_dir=str(data), template="chatml",
             finetuning_type="lora", lora_rank=4, output_dir=str(out), cutoff_len=64, per_device_train_batch_size=4,
             learning_rate=1e-2, max_steps=4, logging_steps=1, save_steps=1000, report_to="none", seed=1,
             overwrite_cache=True)
    c.update(kw)
    return c


def test_lora_run_writes_a_self_describing_folder_and_predictions(tiny_folder, data_dir, tmp_path):
    import llmtune
    from llmtune.tokenizer import load_tokenizer

    out = tmp_path / "sft"
    res = llmtune.train(base_cfg(tiny_folder, data_dir, out, val_size=0.2, do_eval=True, do_predict=True,
                                 predict_with_generate=True, max_new_tokens=4, do_sample=False,
                                 eval_strategy="steps", eval_steps=2, plot_loss=True))
    assert {"train_loss", "eval_loss", "train_runtime"} <= set(res)
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(tiny_folder.resolve()) and acfg["r"] == 4
    assert "llmtune_parent_adapters" not in acfg
    args = yaml.safe_load((out / "training_args.yaml").read_text())
    assert args["template"] == "chatml" and args["lora_rank"] == 4
    assert json.loads((out / "llmtune.json").read_text())["template"] == "chatml"
    gen = json.loads((out / "generation_config.json").read_text())
    tok = load_tokenizer(str(tiny_folder))
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    for name in ("tokenizer.json", "train_results.json", "all_results.json", "eval_results.json",
                 "trainer_log.jsonl", "training_loss.png", "training_eval_loss.png"):
        assert (out / name).is_file(), name
    preds = [json.loads(l) for l in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert preds and all(set(p) == {"prompt", "predict", "label"} for p in preds)
    assert all("<|im_start|>" in p["prompt"] and p["label"] for p in preds)


def test_chained_lora_records_the_root_base_and_parent_adapters(tiny_folder, data_dir, tmp_path):
    import llmtune

    first, second = tmp_path / "pt_like", tmp_path / "sft2"
    llmtune.train(base_cfg(tiny_folder, data_dir, first, max_steps=2))
    llmtune.train(base_cfg(first, data_dir, second, max_steps=2, template=None))
    acfg = json.loads((second / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(tiny_folder.resolve())
    assert not [k for k in acfg if k.startswith("llmtune")]  # llmtune's record is kept out of PEFT's file
    meta = json.loads((second / "llmtune.json").read_text())
    assert meta["base_model_name_or_path"] == str(tiny_folder.resolve())
    assert meta["parent_adapters"] == [str(first.resolve())]
    # the template recorded by the first run is used when none is given
    assert yaml.safe_load((second / "training_args.yaml").read_text())["template"] == "chatml"
    # peft reads our adapter without a warning about keys it does not know
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import warnings

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(hf_base, str(second))
    unknown = [str(w.message) for w in caught if "nexpected" in str(w.message) or "llmtune" in str(w.message)]
    assert not unknown, unknown


def test_full_finetuning_saves_a_loadable_model(tiny_folder, data_dir, tmp_path):
    import llmtune
    from llmtune.models.loader import load_model

    out = tmp_path / "full"
    llmtune.train(base_cfg(tiny_folder, data_dir, out, finetuning_type="full", max_steps=3, learning_rate=1e-3))
    assert not (out / "adapter_config.json").exists()
    trained = load_model(str(out), dtype="float32")
    base = load_model(str(tiny_folder), dtype="float32")
    w_new = trained.model.layers[0].mlp.up_proj.weight
    w_old = base.model.layers[0].mlp.up_proj.weight
    assert w_new.shape == w_old.shape and not torch.equal(w_new, w_old)
    assert trained.lm_head.weight is trained.model.embed_tokens.weight


def test_second_run_into_the_same_output_dir_is_refused(tiny_folder, data_dir, tmp_path):
    import llmtune
    from llmtune.errors import LLMTuneError

    out = tmp_path / "once"
    llmtune.train(base_cfg(tiny_folder, data_dir, out, max_steps=1))
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(LLMTuneError, match="overwrite_output_dir"):
        llmtune.train(base_cfg(tiny_folder, data_dir, out, max_steps=1))
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_bad_lora_target_fails_before_the_data_is_read(tiny_folder, data_dir, tmp_path, monkeypatch):
    import llmtune
    import llmtune.data
    from llmtune.errors import LLMTuneError

    def no_data(*a, **k):
        raise AssertionError("the data was read before lora_target was checked")

    monkeypatch.setattr(llmtune.data, "get_dataset", no_data)
    with pytest.raises(LLMTuneError, match="lora_target.*q_proj"):
        llmtune.train(base_cfg(tiny_folder, data_dir, tmp_path / "o", lora_target="qproj"))
    assert not (tmp_path / "o").exists()


def test_val_size_without_any_evaluation_gets_a_notice(tiny_folder, data_dir, tmp_path, capsys):
    import llmtune

    llmtune.train(base_cfg(tiny_folder, data_dir, tmp_path / "o", val_size=0.25, max_steps=1))
    err = capsys.readouterr().err
    assert "nothing evaluates them" in err and "do_eval" in err
    assert not (tmp_path / "o" / "eval_results.json").exists()


def test_start_up_imports_no_compiler_stack():
    """Importing the commands must not pull in torch._dynamo (about 1.2 s of every command's start-up on this
    CPU), triton or matplotlib: they load only when a run compiles, launches a kernel, or plots."""
    import subprocess
    import sys

    code = ("import sys, llmtune, llmtune.cli, llmtune.train.setup, llmtune.chat, llmtune.export; "
            "print(sorted(m for m in ('torch._dynamo', 'triton', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_training_run_with_checkpoints_imports_no_dynamo(tiny_folder, data_dir, tmp_path):
    """A whole LoRA run that saves and resumes a checkpoint (optimizer state included) never imports
    torch._dynamo: torch's optimizer methods import it on first call (1.5 s of every run's start-up on this
    CPU), llmtune.train.optim.AdamW skips those wrappers."""
    import subprocess
    import sys

    out = tmp_path / "o"
    first = base_cfg(tiny_folder, data_dir, out, max_steps=2, save_steps=1)
    again = dict(base_cfg(tiny_folder, data_dir, out, max_steps=3, save_steps=1, overwrite_output_dir=True),
                 resume_from_checkpoint=str(out / "checkpoint-2"))
    code = ("import json, sys, llmtune; "
            f"llmtune.train(json.loads({json.dumps(json.dumps(first))})); "
            f"llmtune.train(json.loads({json.dumps(json.dumps(again))})); "
            "print(sorted(m for m in ('torch._dynamo',) if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout + run.stderr
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()


def test_python_m_llmtune_train_imports_no_fsdp_and_exits_after_writing_its_outputs(tiny_folder, data_dir, tmp_path):
    """``python -m llmtune train`` in one process (no torchrun) never imports ``torch.distributed.fsdp``
    (DTensor, sympy: 0.3-1 s of CPU; ``is_fsdp`` used to import it on the first step), and its quick exit
    (``llmtune.cli.run``: ``os._exit`` after the atexit handlers) leaves every output written."""
    import subprocess
    import sys

    out = tmp_path / "o"
    flags = [a for k, v in base_cfg(tiny_folder, data_dir, out, max_steps=2).items() for a in (f"--{k}", str(v))]
    code = ("import atexit, runpy, sys; "
            "atexit.register(lambda: print('FSDP', 'torch.distributed.fsdp' in sys.modules, flush=True)); "
            f"sys.argv = ['llmtune', 'train'] + {flags!r}; runpy.run_module('llmtune', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "FSDP False", run.stdout + run.stderr
    logged = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in logged] == [1, 2]
    assert json.loads((out / "all_results.json").read_text())["train_loss"] > 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "llmtune.json").is_file()


def test_llmtune_train_stays_the_package_after_the_notebook_call():
    """``llmtune.train`` reached first through ``llmtune``'s lazy attributes is the (callable) package, so
    ``import llmtune.train.checkpoint`` keeps working in the same process (it failed with 'cannot import name
    checkpoint from train' when the attribute was the function)."""
    import subprocess
    import sys

    code = ("import llmtune; f = llmtune.train; import llmtune.train.checkpoint as ck; "
            "print(callable(f), f is sys.modules['llmtune.train'], ck.__name__)")
    out = subprocess.run([sys.executable, "-c", "import sys; " + code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["True", "True", "llmtune.train.checkpoint"], out.stdout + out.stderr


def test_a_resumed_runs_throughput_counts_only_its_own_tokens(tiny_folder, tmp_path):
    """Every row is the same text, so every step of batch 4 holds the same number of tokens S: a run of 4
    steps processes 4 S, and a run resumed from checkpoint-1 processes 3 S in its own runtime (steps 2-4).
    train_tokens_per_second x train_runtime must be 3/4 of the whole run's, not the whole run's tokens over
    the resumed session's time (which overstated a resumed run's throughput)."""
    import llmtune

    data = tmp_path / "data"
    data.mkdir()
    (data / "same.json").write_text(json.dumps([{"instruction": "hello", "input": "", "output": "hi i am tiny bot"}]
                                               * 16))
    (data / "dataset_info.json").write_text(json.dumps({"same": {"file_name": "same.json"}}))
    out = tmp_path / "o"
    whole = llmtune.train(base_cfg(tiny_folder, data, out, dataset="same", save_steps=1))
    again = llmtune.train(base_cfg(tiny_folder, data, out, dataset="same", save_steps=1,
                                   resume_from_checkpoint=str(out / "checkpoint-1")))
    tokens_whole = whole["train_tokens_per_second"] * whole["train_runtime"]
    tokens_again = again["train_tokens_per_second"] * again["train_runtime"]
    assert tokens_whole > 0
    assert tokens_again == pytest.approx(tokens_whole * 3 / 4, rel=1e-2)
    last = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()][-1]
    assert last["current_steps"] == 4 and last["throughput"] >= 0


def test_load_best_model_at_end_after_a_resume_loads_the_best_checkpoint(tiny_folder, data_dir, tmp_path):
    """load_best_model_at_end kept the best weights in memory only: a run resumed after the best step ended
    with its last weights. Resumed from checkpoint-4 (best step 1 or 2, before it), the final adapter must be
    bit-equal to the one of the run that was never interrupted (which holds the best step's weights)."""
    import llmtune
    from safetensors.torch import load_file

    kw = dict(max_steps=6, val_size=4, eval_strategy="steps", eval_steps=1, save_steps=1,
              load_best_model_at_end=True, greater_is_better=True,   # the highest eval loss: an early step
              per_device_eval_batch_size=4)
    llmtune.train(base_cfg(tiny_folder, data_dir, tmp_path / "whole", **kw))
    state = json.loads((tmp_path / "whole" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["best_global_step"] < 4, state["best_global_step"]   # else this test checks nothing
    out = tmp_path / "resumed"
    llmtune.train(base_cfg(tiny_folder, data_dir, out, **kw))
    llmtune.train(base_cfg(tiny_folder, data_dir, out, resume_from_checkpoint=str(out / "checkpoint-4"), **kw))
    want = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_save_only_model_checkpoints_hold_no_optimizer_state(tiny_folder, data_dir, tmp_path, capsys):
    """save_only_model (Hugging Face: checkpoints without the optimizer state, so they cannot resume exactly)
    was accepted and ignored. Its checkpoints hold no optimizer file; a resume from one says so and goes on."""
    import llmtune

    out = tmp_path / "o"
    llmtune.train(base_cfg(tiny_folder, data_dir, out, save_steps=2, save_only_model=True))
    files = sorted(p.name for p in (out / "checkpoint-2").iterdir())
    assert "trainable.safetensors" in files and not any(name.startswith("optimizer") for name in files)
    capsys.readouterr()
    res = llmtune.train(base_cfg(tiny_folder, data_dir, out, save_steps=2, save_only_model=True,
                                 resume_from_checkpoint=str(out / "checkpoint-2")))
    assert "holds no optimizer state" in capsys.readouterr().err
    assert torch.isfinite(torch.tensor(res["train_loss"]))
    assert [json.loads(x)["current_steps"] for x in (out / "trainer_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_training_with_adapter_name_or_path_says_a_new_adapter_is_trained(tiny_folder, data_dir, tmp_path, capsys):
    """LLaMA-Factory's default (create_new_adapter false) continues the given adapter; llmtune merges it and
    trains a new one on top, recorded as a parent: a notice says so, and the parent is recorded."""
    import llmtune

    first, second = tmp_path / "a", tmp_path / "b"
    llmtune.train(base_cfg(tiny_folder, data_dir, first, max_steps=1))
    capsys.readouterr()
    llmtune.train(base_cfg(tiny_folder, data_dir, second, max_steps=1, adapter_name_or_path=str(first)))
    assert "create_new_adapter" in capsys.readouterr().err
    assert json.loads((second / "llmtune.json").read_text())["parent_adapters"] == [str(first.resolve())]


def test_resume_into_another_output_dir_logs_from_step_one(tiny_folder, data_dir, tmp_path):
    """resume_from_checkpoint pointing at another run's checkpoint-2, with a new output_dir: its
    trainer_log.jsonl started at step 3 (steps 1-2 were only in trainer_state.json); it must hold the same
    steps and losses as the uninterrupted run's log."""
    import llmtune

    first, second = tmp_path / "first", tmp_path / "second"
    llmtune.train(base_cfg(tiny_folder, data_dir, first, save_steps=2))
    llmtune.train(base_cfg(tiny_folder, data_dir, second, save_steps=2,
                           resume_from_checkpoint=str(first / "checkpoint-2")))

    def records(out):
        return [(r["current_steps"], r["loss"]) for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())]

    assert records(second) == records(first) and [s for s, _ in records(second)] == [1, 2, 3, 4]


def test_ref_model_is_loaded_with_the_policy_and_used_as_the_reference(tiny_folder, tmp_path, capsys):
    """dpo, full fine-tuning, ``ref_model`` = the policy's own base: the reference is that loaded model (no frozen
    copy), so before the first update policy and reference agree and the first loss is -log sigmoid(0) = ln 2."""
    import math

    import llmtune

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": f"what is the color of {t}", "input": "", "chosen": c, "rejected": "no idea"}
            for t, c in (("sky", "blue"), ("grass", "green"), ("snow", "white"), ("sun", "yellow"))]
    (data / "pairs.json").write_text(json.dumps(rows * 2))
    columns = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
    (data / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": "pairs.json", "ranking": True,
                                                                  "columns": columns}}))
    out = tmp_path / "dpo"
    llmtune.train(base_cfg(tiny_folder, data, out, stage="dpo", dataset="pairs", finetuning_type="full",
                           learning_rate=1e-3, max_steps=2, pref_loss="sigmoid", pref_beta=0.1,
                           ref_model=str(tiny_folder)))
    assert "frozen copy" not in capsys.readouterr().err
    logs = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines()]
    first = next(r for r in logs if "loss" in r)
    assert abs(first["loss"] - math.log(2)) < 1e-4, first
