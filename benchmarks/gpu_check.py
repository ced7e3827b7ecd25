"""One prepared GPU check (issue 18): kernel tests compiled for the GPU, NF4 speed, LoRA/QLoRA training steps.

Runs on one CUDA GPU in under 5 minutes with only torch, triton, transformers and peft installed and no
Hub access (``benchmarks/gpu_check.sh`` installs llmtune from the checkout with ``--no-deps`` first):

1. ``kernel_tests``: ``pytest tests/test_kernels_fused.py tests/test_kernels_dispatch.py`` with
   ``TRITON_INTERPRET=0`` (real Triton compilation, CUDA tensors).
2. ``nf4``: dequantization GB/s (packed bytes + float32 scales read, bf16 written) against a
   device-to-device copy (``clone`` of 1 GiB: read + write); the 4-bit matmul at M = 1..16 (decode kernel)
   and at training M (tiled kernel, and the input gradient) against a bf16 ``torch.matmul`` with the dense
   weight; every kernel's result is also checked against the PyTorch reference on the same data. Also the
   fused LoRA linear (``llmtune.kernels.lora``: ``x W^T + s (x A^T) B^T`` in one Triton matmul) against
   the unfused torch expression at a Llama-8B projection (4096 -> 14336, r 16) with M = 2048 and 4096,
   bf16, forward and forward+backward, and the same with the weight in NF4 (QLoRA: fused vs
   ``Linear4bit``'s kernels + the adapter term), each result checked against a float32 computation.
3. ``train``: LoRA (bf16 base) and QLoRA (NF4 base, gradient checkpointing) training steps (forward, loss,
   backward, AdamW) at sequence lengths 1024 and 2048, batch 1, every token a label; tokens/s (median of
   the timed steps) and peak allocated GPU memory (``torch.cuda.max_memory_allocated`` since the model was
   built: weights + activations + optimizer state), llmtune against transformers + peft (sdpa attention) in
   the same process, on random-init models of Llama-3.1-8B and Qwen3-8B shape (the layer count is cut when
   the time budget demands it; the table says so). LoRA: rank 16, alpha 32, all linear layers of the
   decoder; float32 adapters and bf16 autocast in both libraries, as their trainers run with bf16. A
   transformers+peft QLoRA baseline needs bitsandbytes, which the GPU image lacks: it runs only
   when bitsandbytes imports.

Each section is guarded (an exception is recorded, the next section runs), the whole run has a time budget
(``--budget``, seconds), and ``benchmarks/results/gpu.json`` is rewritten after every section so a killed run
keeps what it measured. A table is printed at the end.

``--dry-run``: the same code on tiny shapes on the CPU in a few seconds (kernel tests only collected, NF4
through the PyTorch references, tiny Llama/Qwen3 configs), so the script is known to work before it meets
a GPU (CI runs it: ``tests/test_kernels_gpu_check.py``).

Usage: ``bash benchmarks/gpu_check.sh`` or ``python benchmarks/gpu_check.py [--dry-run] [--budget S]
[--out PATH] [--sections tests,nf4,train] [--copy-to DIR]``. Besides the JSON, the printed table is written
next to it (``gpu.md``); ``--copy-to`` copies both into a folder (e.g. one that a remote runner returns).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
KERNEL_TEST_FILES = ["tests/test_kernels_fused.py", "tests/test_kernels_dispatch.py", "tests/test_kernels_lora.py"]

# Hugging Face config.json contents of the two shapes (public architecture facts, no weights).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "head_dim": 128,
    "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001,
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 36, "head_dim": 128,
    "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 36, "bos_token_id": 151643, "eos_token_id": 151645,
}
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 512,
        "bos_token_id": 1, "eos_token_id": 2}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

class Budget:
    """Wall-clock budget of the whole run (seconds)."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def _bench_fn(dev: str) -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of a call: ``triton.testing.do_bench`` on CUDA, wall clock on the CPU."""
    if dev == "cuda":
        import triton.testing as tt

        return lambda fn: float(tt.do_bench(fn, warmup=10, rep=40, return_mode="median"))

    def cpu(fn):
        fn()
        ts = []
        for _ in range(2):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3
    return cpu


def _peak_reset(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(dev: str) -> Optional[float]:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None


def _free(dev: str) -> None:
    import torch

    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def _versions() -> dict:
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "peft", "bitsandbytes"):
        try:
            out[name] = metadata.version(name)
        except Exception:  # noqa: BLE001 (absent is a valid answer)
            out[name] = None
    try:
        out["llmtune_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        out["llmtune_commit"] = None
    return out


# ----------------------------------------------------------------------------------------------------
# 1. kernel tests, compiled
# ----------------------------------------------------------------------------------------------------

def section_kernel_tests(dry: bool, budget: Budget) -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1" if dry else "0"  # explicit: the conftest only sets it when unset
    env["LLMTUNE_AUTOTUNE"] = "0"  # one fixed tile config: autotuning every small test shape costs minutes
    env.pop("LLMTUNE_KERNELS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TEST_FILES]
    if dry:
        cmd.append("--collect-only")
    else:
        import importlib.util

        if importlib.util.find_spec("xdist") is not None:  # compiling the kernels is CPU work: spread it
            cmd += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    timeout = max(10.0, min(90.0, budget.left() - 170.0)) if not dry else 60.0
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += f"\n[timed out after {timeout:.0f} s]"
        rc = -1
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|tests? collected)", text)}
    status = "ok" if rc == 0 else ("timeout" if rc == -1 else "failed")
    return {"status": status, "returncode": rc, "seconds": round(time.monotonic() - t, 1),
            "passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0)
            + counts.get("errors", 0), "skipped": counts.get("skipped", 0),
            "collected": counts.get("tests collected", counts.get("test collected")),
            "compiled": not dry, "tail": text[-3000:]}


# ----------------------------------------------------------------------------------------------------
# 2. NF4
# ----------------------------------------------------------------------------------------------------

def section_nf4(dry: bool, budget: Budget, dev: str) -> dict:
    import torch

    from llmtune.kernels import nf4 as K
    from llmtune.quant.nf4 import quantize_4bit

    bench = _bench_fn(dev)
    res: dict[str, Any] = {"status": "ok", "path": "triton" if K.use_triton(torch.empty(0, device=dev)) else
                           "pytorch reference", "dequant": [], "matmul": [], "grad_input": []}
    nbytes = 1 << (20 if dry else 30)
    big = torch.empty(nbytes // 2, dtype=torch.float16, device=dev)
    copy_ms = bench(lambda: big.clone())
    copy_gbs = 2 * nbytes / copy_ms / 1e6
    res["copy_GBps"] = round(copy_gbs, 1)
    del big
    shapes = [("tiny 96x128", 96, 128)] if dry else [
        ("8B q/o 4096x4096", 4096, 4096), ("8B up 14336x4096", 14336, 4096), ("8B down 4096x14336", 4096, 14336)]
    decode_ms = [1, 2, 4, 8, 16]
    train_ms = [64] if dry else [2048, 4096]
    t_section = time.monotonic()
    for name, n, k in shapes:
        if not dry and (budget.left() < 120 or time.monotonic() - t_section > 40):
            res["note"] = f"stopped before {name}: time budget (the training steps need the rest)"
            break
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        packed, st = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
        absmax, code = st.get_absmax(), st.code.to(dev)
        wq = K.dequantize_4bit_ref(packed, absmax, code, n * k, 64, torch.bfloat16).view(n, k)  # dense NF4 weight
        got = K.dequantize_4bit(packed, absmax, code, n * k, 64, torch.bfloat16).view(n, k)
        err = (got.float() - wq.float()).abs().max().item() / (wq.float().abs().max().item() + 1e-12)
        t = bench(lambda: K.dequantize_4bit(packed, absmax, code, n * k, 64, torch.bfloat16))
        moved = packed.numel() + absmax.numel() * 4 + n * k * 2
        res["dequant"].append({"shape": name, "ms": round(t, 4), "GBps": round(moved / t / 1e6, 1),
                               "fraction_of_copy": round(moved / t / 1e6 / copy_gbs, 3), "max_rel_err": err})
        for m in decode_ms + train_ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            y = K.matmul_4bit(x, packed, absmax, code, n, 64)
            ref = x.float() @ wq.float().t()
            err = (y.float() - ref).abs().max().item() / (ref.abs().max().item() + 1e-12)
            t4 = bench(lambda: K.matmul_4bit(x, packed, absmax, code, n, 64))
            t16 = bench(lambda: torch.matmul(x, w.t()))
            row = {"shape": name, "M": m, "kind": "decode" if m <= K.SMALL_M else "train", "nf4_ms": round(t4, 4),
                   "bf16_ms": round(t16, 4), "speedup_vs_bf16": round(t16 / t4, 3), "max_rel_err": err}
            if m > K.SMALL_M:
                row["dequant_then_bf16_ms"] = round(bench(lambda: torch.matmul(
                    x, K.dequantize_4bit(packed, absmax, code, n * k, 64, torch.bfloat16).view(n, k).t())), 4)
                g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
                gi = K.matmul_4bit_grad_input(g, packed, absmax, code, k, 64)
                gref = g.float() @ wq.float()
                gerr = (gi.float() - gref).abs().max().item() / (gref.abs().max().item() + 1e-12)
                tg = bench(lambda: K.matmul_4bit_grad_input(g, packed, absmax, code, k, 64))
                tgb = bench(lambda: torch.matmul(g, w))
                res["grad_input"].append({"shape": name, "M": m, "nf4_ms": round(tg, 4), "bf16_ms": round(tgb, 4),
                                          "speedup_vs_bf16": round(tgb / tg, 3), "max_rel_err": gerr})
            res["matmul"].append(row)
        del w, packed, absmax, wq, got
        _free(dev)
    try:
        res["lora"] = _bench_lora(dry, dev, bench)
    except Exception as e:  # noqa: BLE001 (recorded; the NF4 rows stand)
        res["lora"] = [{"error": f"{type(e).__name__}: {e}"[:300]}]
    if any("error" in r for r in res["lora"]):
        res["status"] = "partial"
    bad = [r for r in res["dequant"] + res["matmul"] + res["grad_input"] + res["lora"]
           if r.get("max_rel_err", 0.0) > 2e-2]
    if bad:
        res["status"] = "wrong results"
        res["wrong"] = bad
    return res


def _bench_lora(dry: bool, dev: str, bench: Callable[[Callable[[], Any]], float]) -> list[dict]:
    """Fused LoRA linear vs unfused torch at a Llama-8B up projection (in 4096, out 14336, r 16, bf16).

    Unfused is what a LoRA layer runs without the kernel: ``F.linear(x, W) + F.linear(F.linear(x, A), B) * s``
    (the base output and the adapter output written, then read back and added); for QLoRA (the same W in
    NF4) the base is ``Linear4bit``'s own autograd function (the NF4 kernels) plus the same adapter term.
    Rows: forward, and forward + backward (input and adapter gradients; W frozen). ``max_rel_err``: the
    fused forward against float32 math on the same bf16 inputs (and, for QLoRA, the dequantized weight).
    On a GPU the first call of a new shape autotunes the kernel (seconds, outside the timings: ``bench``
    warms up first)."""
    import torch
    import torch.nn.functional as F

    from llmtune.kernels.lora import lora_linear, lora_linear_4bit
    from llmtune.kernels.nf4 import dequantize_4bit_ref
    from llmtune.quant.linear4bit import _Linear4bitFunction
    from llmtune.quant.nf4 import quantize_4bit

    n_in, n_out, r, s = (64, 96, 16, 2.0) if dry else (4096, 14336, 16, 2.0)
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(n_out, n_in, generator=g) * n_in ** -0.5).to(dev, torch.bfloat16)
    packed, st = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    absmax, code = st.get_absmax(), st.code.to(dev)
    w4 = dequantize_4bit_ref(packed, absmax, code, n_out * n_in, 64, torch.bfloat16).view(n_out, n_in)
    a = (torch.randn(r, n_in, generator=g) * n_in ** -0.5).to(dev, torch.bfloat16).requires_grad_()
    b = (torch.randn(n_out, r, generator=g) * r ** -0.5).to(dev, torch.bfloat16).requires_grad_()
    for m in ([48] if dry else [2048, 4096]):
        x = torch.randn(m, n_in, generator=g).to(dev, torch.bfloat16).requires_grad_()
        dy = torch.randn(m, n_out, generator=g).to(dev, torch.bfloat16)
        cases = {
            "LoRA": (lambda: lora_linear(x, w, None, a, b, s),
                     lambda: F.linear(x, w) + F.linear(F.linear(x, a), b) * s, w),
            "QLoRA": (lambda: lora_linear_4bit(x, packed, absmax, code, n_out, 64, None, a, b, s),
                      lambda: _Linear4bitFunction.apply(x, packed, absmax, code, n_out, 64)
                      + F.linear(F.linear(x, a), b) * s, w4),
        }
        for kind, (fused, unfused, wref) in cases.items():
            def step(fn):
                def run():
                    fn().backward(dy)
                    x.grad = a.grad = b.grad = None
                return run

            with torch.no_grad():
                y = fused()
                ref = x.float() @ wref.float().t() + s * ((x.float() @ a.float().t()) @ b.float().t())
                err = (y.float() - ref).abs().max().item() / (ref.abs().max().item() + 1e-12)
                del y, ref
                t_f, t_u = bench(fused), bench(unfused)
            t_fb, t_ub = bench(step(fused)), bench(step(unfused))
            shape = f"{kind} 8B up {n_out}x{n_in} r{r}"
            rows.append({"shape": shape, "M": m, "pass": "forward", "fused_ms": round(t_f, 4),
                         "torch_ms": round(t_u, 4), "speedup": round(t_u / t_f, 3), "max_rel_err": err})
            rows.append({"shape": shape, "M": m, "pass": "forward+backward", "fused_ms": round(t_fb, 4),
                         "torch_ms": round(t_ub, 4), "speedup": round(t_ub / t_fb, 3), "max_rel_err": err})
        del x, dy
        _free(dev)
    return rows


# ----------------------------------------------------------------------------------------------------
# 3. training steps
# ----------------------------------------------------------------------------------------------------

def _config(base: dict, dry: bool, layers: Optional[int]) -> dict:
    cfg = dict(base)
    if dry:
        cfg.update(TINY)
        if cfg["model_type"] == "llama":
            cfg["rope_scaling"] = dict(cfg["rope_scaling"], original_max_position_embeddings=64)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
        if "max_window_layers" in cfg:
            cfg["max_window_layers"] = layers
    return cfg


def _build_llmtune(cfg: dict, dev: str, quant: bool):
    import torch

    from llmtune.models import ModelConfig, Transformer
    from llmtune.peft import apply_lora

    mcfg = ModelConfig.from_hf_dict(cfg)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            torch.manual_seed(0)
            model = Transformer(mcfg)
    finally:
        torch.set_default_dtype(old)
    model.inv_freq = model.inv_freq.float()
    if quant:
        from llmtune.quant import Linear4bit

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, mod in list(parent.named_children()):
                    if isinstance(mod, torch.nn.Linear):
                        q = Linear4bit.from_float(mod.weight.data, None if mod.bias is None else mod.bias.data,
                                                  compute_dtype=torch.bfloat16)
                        setattr(parent, name, q)
                        del mod
        model.gradient_checkpointing_enable()
    model.requires_grad_(False)
    apply_lora(model, lora_rank=16, lora_alpha=32, lora_target="all")
    model.train()

    def loss_fn(ids):
        from llmtune.losses import causal_lm_loss

        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):  # as the trainer with bf16: true
            hidden = model(ids)
            loss_sum, n = causal_lm_loss(hidden, model.lm_head.weight, ids)
        return loss_sum / n
    return model, loss_fn


def _build_hf(cfg: dict, dev: str, quant: bool):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    hf_cfg = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items()
                                                                     if k not in ("model_type", "architectures")})
    hf_cfg._attn_implementation = "sdpa"
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    with torch.device(dev):
        torch.manual_seed(0)
        try:
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, **kwargs)
        except TypeError:  # transformers 4.x spells it torch_dtype
            kwargs["torch_dtype"] = kwargs.pop("dtype")
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, **kwargs)
    if quant:  # pragma: no cover - only where bitsandbytes is installed
        raise RuntimeError("transformers+peft QLoRA from a random-init config is not set up in this check")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()

    def loss_fn(ids):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):  # as Trainer with bf16=True
            return model(input_ids=ids, labels=ids).loss
    return model, loss_fn


def _steps(model, loss_fn, seq: int, vocab: int, dev: str, warmup: int, steps: int) -> dict:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq), generator=g).to(dev)
    times, loss = [], float("nan")
    for i in range(warmup + steps):
        _sync(dev)
        t = time.perf_counter()
        out = loss_fn(ids)
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        loss = float(out.detach())
    del opt
    sec = statistics.median(times)
    return {"step_ms": round(sec * 1e3, 2), "tokens_per_s": round(seq / sec, 1), "loss": round(loss, 4)}


def section_train(dry: bool, budget: Budget, dev: str) -> dict:
    import torch

    from llmtune.kernels import set_enabled

    res: dict[str, Any] = {"status": "ok", "runs": [], "notes": []}
    seqs = [32] if dry else [1024, 2048]
    warmup, steps = (0, 1) if dry else (1, 3)
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        hf_qlora = "bitsandbytes is installed, but this check builds no transformers+peft QLoRA model (not set up)"
    else:
        hf_qlora = "transformers+peft QLoRA not run: it needs bitsandbytes, which is not installed"
    res["notes"].append(hf_qlora)
    res["notes"].append("bf16 base, float32 adapters, bf16 autocast in both libraries (what their trainers do "
                        "with bf16: true); llmtune with its defaults: QLoRA layers take the fused NF4+LoRA kernel, bf16 LoRA layers "
                        f"keep cuBLAS + the adapter (LLMTUNE_FUSED_LORA={os.environ.get('LLMTUNE_FUSED_LORA', 'unset')}; "
                        "the fused-linear table says whether the dense fusion should be turned on)")
    res["notes"].append("LoRA r16/alpha32 on all decoder linears, batch 1, AdamW; QLoRA with gradient "
                        "checkpointing (both libraries' LoRA runs without); peak = max allocated since the model "
                        "was built (weights + activations + optimizer state)")
    plan = [("Llama-3.1-8B", LLAMA31_8B), ("Qwen3-8B", QWEN3_8B)]
    builds = [("llmtune", "lora"), ("transformers+peft", "lora"), ("llmtune", "qlora")]
    jobs = [(m, b, i, meth) for m, b in plan for i, meth in builds]
    # seconds one build + its steps take at full depth (a guess for an H200, raised to what is measured);
    # when the budget left cannot give each remaining job that much, the layer count is cut to fit (one
    # count for the LoRA pair of a model, so that llmtune and transformers+peft compare; QLoRA decides anew)
    est_full = 30.0
    layers_of: dict[tuple[str, str], Optional[int]] = {}
    for j, (model_name, base, impl, method) in enumerate(jobs):
        left = budget.left()
        full = base["num_hidden_layers"]
        if not dry and left < 20:
            res["runs"].append({"model": model_name, "impl": impl, "method": method, "status": "skipped",
                                "reason": f"time budget ({left:.0f} s left)"})
            continue
        group = (model_name, method)
        if group not in layers_of:
            share = (left - 10) / (len(jobs) - j)
            layers_of[group] = None if dry or share >= est_full else max(2, min(full, int(full * share / est_full)))
        layers = layers_of[group]
        cfg = _config(base, dry, layers)
        n_layers = cfg["num_hidden_layers"]
        label = {"model": model_name, "impl": impl, "method": method, "layers": n_layers,
                 "full_layers": full if not dry else n_layers}
        model = loss_fn = None
        t0 = time.monotonic()
        try:
            _free(dev)
            build = _build_llmtune if impl == "llmtune" else _build_hf
            model, loss_fn = build(cfg, dev, method == "qlora")
            _free(dev)
            build_s = time.monotonic() - t0
            variants = [(seq, True) for seq in seqs]
            if impl == "llmtune" and method == "lora" and j == 0:
                variants.append((seqs[0], False))  # kernels off (first model only): what the kernels bring
            for seq, kernels in variants:
                if not dry and budget.left() < 10:
                    res["runs"].append({**label, "seq": seq, "status": "skipped", "reason": "time budget"})
                    continue
                set_enabled(kernels)
                _peak_reset(dev)
                try:
                    r = _steps(model, loss_fn, seq, cfg["vocab_size"], dev, warmup, steps)
                    res["runs"].append({**label, "seq": seq, "kernels": kernels if impl == "llmtune" else None,
                                        "status": "ok", **r, "peak_GiB": _peak_gib(dev),
                                        "build_s": round(build_s, 1)})
                except (getattr(torch, "OutOfMemoryError", MemoryError), MemoryError) as e:
                    res["runs"].append({**label, "seq": seq, "status": "oom", "reason": str(e)[:300]})
                finally:
                    set_enabled(None)
        except Exception as e:  # noqa: BLE001 (recorded; the next build runs)
            res["runs"].append({**label, "status": "error", "reason": f"{type(e).__name__}: {e}"[:500],
                                "traceback": traceback.format_exc()[-2000:]})
        finally:
            model = loss_fn = None  # the closure holds the model too: both go before the next build
            _free(dev)
            if not dry:
                est_full = max(est_full, (time.monotonic() - t0) * full / n_layers)
    # llmtune / transformers+peft tokens/s, same model, method, seq
    ratios = []
    for r in res["runs"]:
        if r.get("impl") == "llmtune" and r.get("status") == "ok" and r.get("kernels"):
            for h in res["runs"]:
                if h.get("impl") == "transformers+peft" and h.get("status") == "ok" and h["model"] == r["model"] \
                        and h["seq"] == r["seq"] and h["method"] == "lora" and h["layers"] == r["layers"]:
                    ratios.append({"model": r["model"], "method": r["method"], "seq": r["seq"], "layers": r["layers"],
                                   "speedup_vs_hf_lora": round(r["tokens_per_s"] / h["tokens_per_s"], 3)})
    res["ratios"] = ratios
    if any(r.get("status") in ("error", "oom") for r in res["runs"]):
        res["status"] = "partial"
    return res


# ----------------------------------------------------------------------------------------------------
# targets, table, main
# ----------------------------------------------------------------------------------------------------

def targets(results: dict) -> list[dict]:
    """The issue's targets, read off the measured results (None where not measured)."""
    out = []
    tr = results.get("train", {})
    lora = [r for r in tr.get("ratios", []) if r["method"] == "lora"]
    out.append({"target": "LoRA step >= 1.8x transformers+peft tokens/s",
                "value": min((r["speedup_vs_hf_lora"] for r in lora), default=None),
                "met": (min(r["speedup_vs_hf_lora"] for r in lora) >= 1.8) if lora else None})
    q = [r for r in tr.get("runs", []) if r.get("status") == "ok" and r["impl"] == "llmtune" and r["method"] == "qlora"
         and r["seq"] == 1024 and r["model"] == "Llama-3.1-8B" and r["layers"] == r["full_layers"]]
    peak = q[0]["peak_GiB"] if q and q[0]["peak_GiB"] is not None else None
    out.append({"target": "8B QLoRA step at 1024 tokens <= 6 GB peak (Llama-3.1-8B shape, all layers)",
                "value": None if peak is None else round(peak * 2**30 / 1e9, 2),
                "met": None if peak is None else peak * 2**30 / 1e9 <= 6.0})
    nf = results.get("nf4", {})
    dec = [r["speedup_vs_bf16"] for r in nf.get("matmul", []) if r["M"] == 1]
    out.append({"target": "NF4 decode matmul (M=1) >= 2.5x bf16", "value": min(dec, default=None),
                "met": (min(dec) >= 2.5) if dec else None})
    dq = [r["fraction_of_copy"] for r in nf.get("dequant", [])]
    out.append({"target": "NF4 dequantize >= 80% of copy bandwidth", "value": min(dq, default=None),
                "met": (min(dq) >= 0.8) if dq else None})
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def render(results: dict) -> str:
    """Markdown tables of a results dict (what ``main`` prints; also pasted into docs/performance.md)."""
    parts = []
    m = results.get("meta", {})
    parts.append(f"device: {m.get('device')}; torch {m.get('versions', {}).get('torch')}, triton "
                 f"{m.get('versions', {}).get('triton')}, transformers {m.get('versions', {}).get('transformers')}, "
                 f"peft {m.get('versions', {}).get('peft')}; dry run: {m.get('dry_run')}; "
                 f"{m.get('elapsed_s')} s of a {m.get('budget_s')} s budget")
    kt = results.get("kernel_tests")
    if kt:
        parts.append("\n### Kernel tests (compiled)\n" + _table(
            ["status", "passed", "failed", "skipped", "collected", "seconds"],
            [[kt.get("status"), kt.get("passed"), kt.get("failed"), kt.get("skipped"), kt.get("collected"),
              kt.get("seconds")]]))
    nf = results.get("nf4")
    if nf:
        if "error" in nf:
            parts.append(f"\n### NF4\nerror: {nf['error']}")
        else:
            parts.append(f"\n### NF4 dequantize (copy bandwidth {nf.get('copy_GBps')} GB/s; {nf.get('path')})\n" + _table(
                ["shape", "ms", "GB/s", "of copy", "max rel err"],
                [[r["shape"], r["ms"], r["GBps"], r["fraction_of_copy"], r["max_rel_err"]] for r in nf["dequant"]]))
            parts.append("\n### NF4 matmul vs bf16 torch.matmul\n" + _table(
                ["shape", "M", "nf4 ms", "bf16 ms", "speedup", "dequant+bf16 ms", "max rel err"],
                [[r["shape"], r["M"], r["nf4_ms"], r["bf16_ms"], r["speedup_vs_bf16"], r.get("dequant_then_bf16_ms"),
                  r["max_rel_err"]] for r in nf["matmul"]]))
            lora_rows = [r for r in nf.get("lora", []) if "error" not in r]
            if lora_rows:
                parts.append("\n### Fused LoRA / QLoRA linear (x W^T + s (x A^T) B^T, bf16) vs unfused\n" + _table(
                    ["shape", "M", "pass", "fused ms", "torch ms", "speedup", "max rel err"],
                    [[r["shape"], r["M"], r["pass"], r["fused_ms"], r["torch_ms"], r["speedup"], r["max_rel_err"]]
                     for r in lora_rows]))
            for r in nf.get("lora", []):
                if "error" in r:
                    parts.append(f"\nFused LoRA linear: error: {r['error']}")
            if nf.get("grad_input"):
                parts.append("\n### NF4 input gradient (grad_out @ W) vs bf16\n" + _table(
                    ["shape", "M", "nf4 ms", "bf16 ms", "speedup"],
                    [[r["shape"], r["M"], r["nf4_ms"], r["bf16_ms"], r["speedup_vs_bf16"]] for r in nf["grad_input"]]))
    tr = results.get("train")
    if tr:
        if "error" in tr:
            parts.append(f"\n### Training steps\nerror: {tr['error']}")
        else:
            rows = []
            for r in tr["runs"]:
                layers = f"{r.get('layers')}/{r.get('full_layers')}" if r.get("layers") is not None else "-"
                rows.append([r["model"], layers, r["method"], r["impl"] + ("" if r.get("kernels") in (None, True)
                                                                         else " (kernels off)"),
                             r.get("seq"), r.get("tokens_per_s"), r.get("step_ms"), r.get("peak_GiB"), r.get("loss"),
                             r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')[:60]}"])
            parts.append("\n### Training steps (batch 1; layers run/full)\n" + _table(
                ["model", "layers", "method", "impl", "seq", "tokens/s", "step ms", "peak GiB", "loss", "status"], rows))
            if tr.get("ratios"):
                parts.append("\n" + _table(["model", "method", "seq", "layers", "llmtune / transformers+peft LoRA"],
                                           [[r["model"], r["method"], r["seq"], r["layers"], r["speedup_vs_hf_lora"]]
                                            for r in tr["ratios"]]))
            for n in tr.get("notes", []):
                parts.append(f"- {n}")
    tg = results.get("targets")
    if tg:
        parts.append("\n### Targets (issue 18)\n" + _table(["target", "measured", "met"],
                                                           [[t["target"], t["value"], t["met"]] for t in tg]))
    return "\n".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (a few seconds)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 275; dry 120)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu.json; dry: gpu_dryrun.json)")
    ap.add_argument("--sections", default="tests,nf4,train", help="comma list of tests, nf4, train")
    ap.add_argument("--copy-to", default=None, help="also copy the JSON and the table (.md) into this folder")
    args = ap.parse_args(argv)

    import torch

    dry = args.dry_run
    dev = "cpu" if dry or not torch.cuda.is_available() else "cuda"
    if dev == "cpu" and not dry:
        print("gpu_check: no CUDA device; running the dry run instead (tiny shapes on the CPU)")
        dry = True
    budget = Budget(args.budget if args.budget is not None else (120.0 if dry else 275.0))
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / ("gpu_dryrun.json" if dry else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"meta": {
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "dry_run": dry, "budget_s": budget.seconds, "versions": _versions(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}

    def save():
        results["meta"]["elapsed_s"] = round(budget.elapsed(), 1)
        results["targets"] = targets(results)
        out.write_text(json.dumps(results, indent=1, default=str) + "\n")

    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    sections = {"tests": ("kernel_tests", lambda: section_kernel_tests(dry, budget)),
                "nf4": ("nf4", lambda: section_nf4(dry, budget, dev)),
                "train": ("train", lambda: section_train(dry, budget, dev))}
    for key in wanted:
        if key not in sections:
            print(f"gpu_check: unknown section {key!r} (use tests, nf4, train)", file=sys.stderr)
            return 2
        name, fn = sections[key]
        if budget.left() < 5:
            results[name] = {"status": "skipped", "reason": "time budget"}
            save()
            continue
        print(f"gpu_check: {name} ({budget.left():.0f} s left)", flush=True)
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 (recorded; the other sections still run)
            results[name] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500],
                             "traceback": traceback.format_exc()[-3000:]}
        save()
    save()
    try:
        table = render(results)
    except Exception as e:  # noqa: BLE001 (the JSON is saved already)
        table = f"(table failed: {type(e).__name__}: {e})"
    print(table)
    out.with_suffix(".md").write_text(table + "\n")
    if args.copy_to:
        import shutil

        dest = Path(args.copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, dest / out.name)
        shutil.copy(out.with_suffix(".md"), dest / out.with_suffix(".md").name)
    print(f"\ngpu_check: results in {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
