"""Scale-out: DDP and FSDP2 on 2 CPU processes (gloo) against single-process references.

Workers are started with ``torch.multiprocessing.spawn`` (a file:// rendezvous, no ports) or, for the
command line, with ``python -m torch.distributed.run`` / plain processes carrying torchrun's environment.
Each spawn costs an interpreter start and a torch import per rank, so every worker checks several things.
"""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import free_port, identity_data, subprocess_env
from spawn_helpers import spawn_ranks
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_helpers import VOCAB, rows, tiny_model

from llmtune.train.distributed import shard_indices
from llmtune.train.wrap import fsdp_options
from llmtune.train.logging import read_log
from config_helpers import make_config

WORLD = 2
REPO = Path(__file__).resolve().parents[1]


#: different lengths -> different loss-token counts per rank (a per-rank mean would be wrong)
LENGTHS = [5, 17, 8, 12, 6, 15, 9, 11]


def config(out, **kw):
    base = dict(stage="sft", output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                learning_rate=1e-3, max_steps=4, logging_steps=1, save_steps=1000, seed=7,
                lr_scheduler_type="constant", report_to="none", finetuning_type="full")
    base.update(kw)
    return make_config(**base)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def hand_loss_and_grads(model, data):
    """Mean next-token cross-entropy over all label tokens of ``data`` (full logits), and its gradients."""
    t = max(len(r["input_ids"]) for r in data)
    pad = lambda r, k, v: r[k] + [v] * (t - len(r[k]))  # noqa: E731
    ids = torch.tensor([pad(r, "input_ids", 0) for r in data])
    mask = torch.tensor([pad(r, "attention_mask", 0) for r in data])
    labels = torch.tensor([pad(r, "labels", -100) for r in data])
    logits = model.lm_head(model(ids, attention_mask=mask))
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _init(rank, init_file, timeout_s=60):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=timeout_s))
    torch.set_num_threads(1)


def spawn(fn, tmp_path, *args):
    """``fn(rank, init_file, tmp, *args)`` on WORLD ranks, with a deadline (tests/spawn_helpers.py)."""
    spawn_ranks(fn, tmp_path, *args, nprocs=WORLD)


# -- pure helpers (no processes) ------------------------------------------------------------------
def test_shard_indices_pads_to_equal_shards_like_distributed_sampler():
    # hand-computed: 5 indices on 2 ranks -> padded with the first one: [3,1,4,0,2,3]
    order = [3, 1, 4, 0, 2]
    assert shard_indices(order, 0, 2) == [3, 4, 2]
    assert shard_indices(order, 1, 2) == [1, 0, 3]
    assert shard_indices(order, 1, 2, pad=False) == [1, 0]
    assert shard_indices([7], 2, 3) == [7]  # fewer rows than ranks: wrap around
    assert shard_indices(order, 0, 1) == order
    for n in range(1, 12):
        shards = [shard_indices(list(range(n)), r, 4) for r in range(4)]
        assert len({len(s) for s in shards}) == 1 and set(sum(shards, [])) == set(range(n))


def test_fsdp_option_parsing():
    from llmtune.errors import LLMTuneError

    assert fsdp_options(make_config(fsdp=None)) is None and fsdp_options(make_config(fsdp="")) is None
    assert fsdp_options(make_config(fsdp="full_shard auto_wrap")) == {"reshard_after_forward": True, "offload": False}
    assert fsdp_options(make_config(fsdp="shard_grad_op")) == {"reshard_after_forward": False, "offload": False}
    assert fsdp_options(make_config(fsdp="full_shard,offload"))["offload"] is True
    with pytest.raises(LLMTuneError, match="fsdp: 'hybrid_shard'"):   # refused when the config is built
        make_config(fsdp="hybrid_shard")


def test_world_size_without_torchrun_variables_is_a_clear_error(monkeypatch):
    from llmtune.errors import LLMTuneError
    from llmtune.train.distributed import init_distributed

    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LLMTuneError, match="WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT.*torchrun"):
        init_distributed(make_config(ddp_timeout=30))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed(make_config()) is False  # one process: no process group


def test_fsdp_shards_lora_too():
    from llmtune.peft import apply_lora
    from llmtune.train.wrap import choose_strategy

    model = tiny_model()
    assert choose_strategy(model, make_config(fsdp="full_shard", finetuning_type="full")) == "fsdp"
    assert choose_strategy(model, make_config(finetuning_type="full")) == "ddp"
    apply_lora(model, lora_rank=2)
    assert choose_strategy(model, make_config(fsdp="full_shard", finetuning_type="lora")) == "fsdp"
    assert choose_strategy(model, make_config(finetuning_type="lora")) == "ddp"


# -- DDP: 2 ranks x batch 2 == 1 rank x batch 4 ----------------------------------------------------
def _ddp_worker(rank, init_file, tmp, _unused=None):
    _init(rank, init_file)
    from llmtune.peft import apply_lora
    from llmtune.train.wrap import DDPModel
    from llmtune.train.trainer import Trainer

    data = rows(LENGTHS)
    result = {}
    for name, kw, lora in (("bs2", dict(per_device_train_batch_size=2), False),
                           ("ga2", dict(per_device_train_batch_size=1, gradient_accumulation_steps=2), False),
                           ("lora", dict(per_device_train_batch_size=2, finetuning_type="lora"), True)):
        model = tiny_model()
        if lora:
            torch.manual_seed(3)
            apply_lora(model, lora_rank=4, lora_target="all")
            with torch.no_grad():  # non-zero B so that every adapter matrix gets a gradient
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1)
        tr = Trainer(model, config(Path(tmp) / name, **kw), data)
        assert isinstance(tr.model, DDPModel)
        # only the trainable parameters are in DDP's reducer
        assert {id(p) for p in tr.model.parameters() if p.requires_grad} == \
               {id(p) for p in model.parameters() if p.requires_grad}
        step = tr.epoch_steps(0)[0]
        loss, items, _ = tr.accumulate_gradients([tr.collate(ix) for ix in step])
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        result[name] = {"loss": loss, "items": items, "indices": [i for mb in step for i in mb],
                        "frozen_with_grad": frozen_grads}
        save_file(grads, str(Path(tmp) / f"grads-{name}-rank{rank}.safetensors"))
    (Path(tmp) / f"ddp-rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def test_ddp_two_ranks_give_the_gradient_of_one_big_batch(tmp_path):
    t0 = time.time()
    spawn(_ddp_worker, tmp_path)
    res = [json.loads((tmp_path / f"ddp-rank{r}.json").read_text()) for r in range(WORLD)]
    from llmtune.peft import apply_lora
    from llmtune.train.trainer import Trainer

    data = rows(LENGTHS)
    # the single-process run's first step of batch 4 holds exactly the rows of the two ranks
    single = Trainer(tiny_model(), config(tmp_path / "single", per_device_train_batch_size=4), data)
    big = single.epoch_steps(0)[0][0]
    for name in ("bs2", "ga2", "lora"):
        assert sorted(res[0][name]["indices"] + res[1][name]["indices"]) == sorted(big)
        assert res[0][name]["loss"] == res[1][name]["loss"] and res[0][name]["items"] == res[1][name]["items"]
        model = tiny_model()
        if name == "lora":
            torch.manual_seed(3)
            apply_lora(model, lora_rank=4, lora_target="all")
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1)
        ref_loss, ref_grads = hand_loss_and_grads(model, [data[i] for i in big])
        ref_grads = {n: g for n, g in ref_grads.items() if dict(model.named_parameters())[n].requires_grad}
        assert abs(res[0][name]["loss"] - ref_loss) <= 1e-5 * abs(ref_loss), name
        assert res[0][name]["items"] == sum(sum(1 for x in data[i]["labels"][1:] if x != -100) for i in big)
        assert res[0][name]["frozen_with_grad"] == []
        for r in range(WORLD):
            got = load_file(str(tmp_path / f"grads-{name}-rank{r}.safetensors"))
            assert sorted(got) == sorted(ref_grads), name
            for n, g in ref_grads.items():
                assert rel(got[n], g) <= 1e-5, (name, n, rel(got[n], g))
    print(f"ddp test: {time.time() - t0:.1f} s")


# -- FSDP2: full fine-tuning == single process; sharded checkpoint resumes -------------------------
def _fsdp_worker(rank, init_file, tmp, _unused=None):
    _init(rank, init_file)
    from torch.distributed.fsdp import FSDPModule

    from llmtune.train.wrap import gather_full_state_dict
    from llmtune.train.trainer import Trainer

    data = rows(LENGTHS)
    out = Path(tmp) / "fsdp"
    model = tiny_model()
    tr = Trainer(model, config(out, fsdp="full_shard", save_steps=2), data)
    assert isinstance(tr.model, FSDPModule)
    tr.train()
    full = gather_full_state_dict(model)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items() if k != "lm_head.weight"},
                  str(Path(tmp) / "fsdp-weights.safetensors"))
    # a fresh run resumed from the sharded checkpoint of step 2
    out_b = Path(tmp) / "fsdp-resumed"
    if rank == 0:
        out_b.mkdir()
        import shutil

        shutil.copytree(out / "checkpoint-2", out_b / "checkpoint-2")
    torch.distributed.barrier()
    tr_b = Trainer(tiny_model(seed=5), config(out_b, fsdp="full_shard", save_steps=1000,
                                              resume_from_checkpoint=str(out_b / "checkpoint-2")), data)
    tr_b.train()
    full_b = gather_full_state_dict(tr_b.model)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full_b.items() if k != "lm_head.weight"},
                  str(Path(tmp) / "fsdp-resumed-weights.safetensors"))
    torch.distributed.destroy_process_group()


def test_fsdp_full_finetuning_matches_single_process_and_resumes(tmp_path):
    t0 = time.time()
    spawn(_fsdp_worker, tmp_path)
    from llmtune.train.trainer import Trainer

    data = rows(LENGTHS)
    model = tiny_model()
    Trainer(model, config(tmp_path / "single", per_device_train_batch_size=4, save_steps=2), data).train()
    ref = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ref_losses = [r["loss"] for r in read_log(tmp_path / "single") if "loss" in r]

    got = load_file(str(tmp_path / "fsdp-weights.safetensors"))
    assert sorted(got) == sorted(ref)
    moved = max(rel(ref[k], tiny_model().state_dict()[k]) for k in ref)
    assert moved > 1e-3  # the weights did change over the 4 steps
    for k in ref:
        assert rel(got[k], ref[k]) <= 1e-5, (k, rel(got[k], ref[k]))
    losses = [r["loss"] for r in read_log(tmp_path / "fsdp") if "loss" in r]
    assert len(losses) == 4 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, ref_losses)), (losses, ref_losses)

    # sharded checkpoint: per-rank safetensors shards, no pickle files; resumed run == uninterrupted run
    ck = tmp_path / "fsdp" / "checkpoint-2"
    files = sorted(p.name for p in (ck / "fsdp_shards").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) == WORLD, files
    assert not any(p.suffix in (".pt", ".bin", ".pkl") or p.name == ".metadata" for p in ck.rglob("*"))
    resumed = {r["current_steps"]: r["loss"] for r in read_log(tmp_path / "fsdp-resumed") if "loss" in r}
    assert sorted(resumed) == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's history, as the uninterrupted log
    for step in (1, 2, 3, 4):
        assert abs(resumed[step] - losses[step - 1]) <= 1e-6 * abs(losses[step - 1])
    got_b = load_file(str(tmp_path / "fsdp-resumed-weights.safetensors"))
    for k in ref:
        assert rel(got_b[k], got[k]) <= 1e-6, k

    # issue 25: the sharded checkpoint as model_name_or_path in ONE process, without a process group: its recorded
    # base (written here as `llmtune train` copies the run record in; another seed, so every tensor must come from
    # the shards) with the shards laid over == the one-process run's checkpoint-2, a model folder
    from llmtune.runs import load_model

    base, other = tmp_path / "base", tiny_model(seed=5)
    base.mkdir()
    save_file({k: v.contiguous() for k, v in other.state_dict().items() if k != "lm_head.weight"},
              str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps(other.config.to_hf_dict()))
    (ck / "llmtune.json").write_text(json.dumps({"finetuning_type": "full", "base_model_name_or_path": str(base),
                                                 "parent_adapters": []}))
    laid = load_model(str(ck), dtype=torch.float32).state_dict()
    step2 = load_file(str(tmp_path / "single" / "checkpoint-2" / "model.safetensors"))
    assert sorted(step2) == sorted(ref) and not torch.distributed.is_initialized()
    for k in step2:
        assert rel(laid[k], step2[k]) <= 1e-5, (k, rel(laid[k], step2[k]))
    print(f"fsdp test: {time.time() - t0:.1f} s")


# -- the command line under torchrun, on the real model (tests/cli_helpers.py) -----------------------
@pytest.mark.real
def test_torchrun_sft_lora_on_the_real_model_saves_an_adapter(real_model_path, shared_data_dir, tmp_path):
    t0 = time.time()
    data = identity_data(shared_data_dir, tmp_path / "data")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "llmtune", "train", "--stage", "sft", "--do_train", "true",
           "--model_name_or_path", str(real_model_path), "--dataset", "identity", "--dataset_dir", str(data),
           "--template", "chatml", "--finetuning_type", "lora", "--lora_target", "q_proj,v_proj",
           "--lora_rank", "4", "--cutoff_len", "64", "--max_samples", "8", "--per_device_train_batch_size", "2",
           "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3", "--output_dir", str(out),
           "--ddp_timeout", "300", "--report_to", "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in adapter.items())  # trained (B starts at 0)
    logs = [r for r in read_log(out) if "loss" in r]
    assert [r["current_steps"] for r in logs] == [1, 2]  # rank 0 alone logs: one line per step
    results = json.loads((out / "all_results.json").read_text())
    # 2 ranks x batch 2: LLaMA-Factory's samples/s counts the global batch (4 per step)
    assert results["train_samples_per_second"] > 0
    print(f"torchrun real sft: {time.time() - t0:.1f} s")


@pytest.mark.real
def test_a_killed_rank_stops_the_other_with_a_message_within_ddp_timeout(real_model_path, shared_data_dir,
                                                                         tmp_path):
    """Rank 1 is SIGKILLed mid-run; rank 0 must exit non-zero with llmtune's message, well within the
    collective timeout (ddp_timeout 20 s), instead of hanging."""
    t0 = time.time()
    from tiny_helpers import real_tokenizer_folder

    folder = real_tokenizer_folder(real_model_path, tmp_path / "tiny", hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    data = identity_data(shared_data_dir, tmp_path / "data")
    out = tmp_path / "out"
    timeout = 20
    port = free_port()
    procs = []
    for r in range(WORLD):
        env = dict(subprocess_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "llmtune", "train", "--stage", "sft", "--model_name_or_path", str(folder),
               "--dataset", "identity", "--dataset_dir", str(data), "--template", "chatml", "--finetuning_type",
               "full", "--cutoff_len", "32", "--per_device_train_batch_size", "1", "--max_steps", "100000",
               "--logging_steps", "1", "--save_steps", "1000000", "--output_dir", str(out),
               "--ddp_timeout", str(timeout), "--report_to", "none"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=tmp_path))
    try:
        log = out / "trainer_log.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
            assert procs[0].poll() is None and procs[1].poll() is None, procs[0].communicate()[1][-3000:]
            time.sleep(0.2)
        assert log.is_file(), "training never started"
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, err = procs[0].communicate(timeout=timeout + 40)
        waited = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode not in (0, None)
    assert waited < timeout + 30, waited
    assert "llmtune: error: rank 0 of 2" in err and "ddp_timeout = 20" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    print(f"kill test: {time.time() - t0:.1f} s, rank 0 stopped {waited:.1f} s after the kill")
