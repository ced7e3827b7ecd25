"""Training sections of the GPU check (``benchmarks/gpu_check.py``): packed multi-row steps for LoRA,
QLoRA and full fine-tuning in bf16 and fp16; LoRA tokens/s against transformers+peft; 8B QLoRA peak
memory at 1024 tokens; a Qwen3-MoE-shaped step with the grouped expert products.

Every function takes a :class:`gpu_check_common.Section` and fills ``sec.result`` (the orchestrator runs
each in its own process). Models are random-init, of public architecture shapes, built on the device.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any

from gpu_check_common import (LLAMA31_8B, LLAMA32_1B, QWEN3_30B_A3B, Section, build_llmtune, free, guarded,
                              packed_batch, peak_gb, rel_err, reset_peak, shape_config, train_steps)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@contextlib.contextmanager
def count_calls(module: Any, attr: str, counts: dict):
    """Wrap ``module.attr`` (when it exists) so ``counts`` gets ``calls`` (returned normally), ``raised``
    and the first ``first_error``; restored on exit. Used to see whether ``varlen_attn`` or
    ``torch._grouped_mm`` actually ran (the library falls back silently where they raise)."""
    fn = getattr(module, attr, None) if module is not None else None
    counts.setdefault("calls", 0)
    counts.setdefault("raised", 0)
    counts["available"] = counts.get("available", False) or fn is not None
    if fn is None:
        yield counts
        return

    def wrapper(*args, **kwargs):
        try:
            out = fn(*args, **kwargs)
        except Exception as e:
            counts["raised"] += 1
            counts.setdefault("first_error", f"{type(e).__name__}: {e}"[:400])
            raise
        counts["calls"] += 1
        return out
    setattr(module, attr, wrapper)
    try:
        yield counts
    finally:
        setattr(module, attr, fn)


def _varlen_module(dev: str):
    """``torch.nn.attention.varlen`` on CUDA (importing it imports torch._dynamo: seconds, so not on the CPU,
    where the variable-length kernel never runs)."""
    if dev != "cuda":
        return None
    try:
        import torch.nn.attention.varlen as varlen
    except ImportError:
        return None
    return varlen


def _check_losses(r: dict, vocab: int) -> bool:
    """A random-init model's first loss is near ln(vocab); every loss must be finite."""
    return r["finite"] and abs(r["losses"][0] - math.log(vocab)) < 0.35 * math.log(vocab)


def section_train_packed(sec: Section) -> None:
    """LoRA, QLoRA and full fine-tuning, bf16 and fp16, two optimizer steps each on one packed batch:
    2 rows of 1024 tokens, each row three or two segments of different lengths (padding-free: segment ids
    in ``attention_mask``, ``position_ids`` restarting per segment, so on CUDA the spans tile the batch and
    attention goes through ``varlen_attn``), GQA (32 query / 8 key-value heads), on a Llama-3.2-1B-shaped
    model cut to 4 layers; and LoRA bf16 on a padded batch (rows of 800 and 1024 tokens: spans that do not
    tile it, the per-span attention path). What the trainer runs: LoRA/QLoRA base in the precision's dtype
    with float32 adapters, full fine-tuning with float32 weights, autocast, GradScaler under fp16. Per run:
    tokens/s (second step; padding not counted), peak memory, losses (finite, near ln(vocab)),
    ``varlen_attn`` calls."""
    import torch

    dev, dry = sec.dev, sec.dry
    cfg = shape_config(LLAMA32_1B, dry, layers=2 if dry else 4)
    lengths = [[10, 14, 8], [25, 7]] if dry else [[300, 500, 224], [1000, 24]]
    padded = [[10, 14], [25, 7]] if dry else [[300, 500], [1000, 24]]
    batches = {"packed": packed_batch(lengths, cfg["vocab_size"], dev),
               "padded": packed_batch(padded, cfg["vocab_size"], dev, pad=True)}
    runs: list = []
    sec.result.update(model="Llama-3.2-1B shape, %d layers" % cfg["num_hidden_layers"], segments=lengths,
                      padded_segments=padded, runs=runs)
    plan = [(m, d, "packed") for d in (torch.bfloat16, torch.float16) for m in ("lora", "qlora", "full")]
    plan.append(("lora", torch.bfloat16, "padded"))  # spans that do not tile the batch: the per-span path
    for method, dtype, kind in plan:
        label = {"method": method, "dtype": str(dtype).replace("torch.", ""), "batch": kind}
        batch = batches[kind]
        if not sec.enough(6):
            sec.skip(f"{method} {label['dtype']} {kind}")
            continue

        def one(method=method, dtype=dtype, batch=batch):
            counts: dict = {}
            model = build_llmtune(cfg, dev, method, dtype)
            free()
            reset_peak(dev)
            with count_calls(_varlen_module(dev), "varlen_attn", counts), \
                    count_calls(sys.modules.get("llmtune.models.transformer"), "varlen_attn", counts):
                r = train_steps(model, batch, dev, dtype, steps=1 if dry else 2)
            r.update(peak_gb=peak_gb(dev), varlen_attn=counts, loss_plausible=_check_losses(r, cfg["vocab_size"]))
            return r
        guarded(sec, runs, label, one)
    bad = [r for r in runs if r["status"] != "ok" or not r.get("loss_plausible")]
    if dev == "cuda":  # the padding-free batch should have gone through the variable-length kernel
        sec.result["warnings"] = [f"{r['method']} {r['dtype']}: varlen_attn exists but did not run (fallback)"
                                  for r in runs if r["status"] == "ok" and r["batch"] == "packed"
                                  and r["varlen_attn"].get("available") and not r["varlen_attn"]["calls"]]
    sec.result["status"] = "failed" if bad or not runs else "ok"


def build_hf(cfg: dict, dev: str):
    """transformers + peft LoRA (r 16, alpha 32, every decoder linear, sdpa attention) on a random-init
    ``cfg`` model in bf16 on ``dev`` (transformers and peft are imported only here)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    hf_cfg = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items()
                                                                     if k not in ("model_type", "architectures")})
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    with torch.device(dev):
        torch.manual_seed(0)
        try:
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, **kwargs)
        except TypeError:  # transformers 4.x spells it torch_dtype
            kwargs["torch_dtype"] = kwargs.pop("dtype")
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, **kwargs)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    return model


def section_lora_vs_hf(sec: Section) -> None:
    """LoRA training tokens/s, llmtune against transformers+peft on the same input: a Llama-3.1-8B-shaped
    model cut to 8 layers (so both fit the time cap; ``layers`` says so), one row of 2048 tokens (every
    token a label), r 16 / alpha 32 on every decoder linear, bf16 base, float32 adapters, bf16 autocast,
    AdamW; three steps, the first a warm-up. ``ratio`` = llmtune tokens/s / transformers+peft tokens/s."""
    import torch

    dev, dry = sec.dev, sec.dry
    cfg = shape_config(LLAMA31_8B, dry, layers=2 if dry else 8)
    seq = 32 if dry else 2048
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (1, seq), generator=g).to(dev)
    batch = {"input_ids": ids, "labels": ids}
    runs: list = []
    sec.result.update(model="Llama-3.1-8B shape", layers=cfg["num_hidden_layers"],
                      full_layers=LLAMA31_8B["num_hidden_layers"], seq=seq, runs=runs)
    for impl in ("llmtune", "transformers+peft"):
        if not sec.enough(10):
            sec.skip(impl)
            continue

        def one(impl=impl):
            model = build_llmtune(cfg, dev, "lora", torch.bfloat16) if impl == "llmtune" else build_hf(cfg, dev)
            free()
            reset_peak(dev)
            r = train_steps(model, batch, dev, torch.bfloat16, steps=1 if dry else 3, hf=impl != "llmtune")
            r.update(peak_gb=peak_gb(dev), loss_plausible=_check_losses(r, cfg["vocab_size"]))
            return r
        guarded(sec, runs, {"impl": impl}, one)
    ok = {r["impl"]: r for r in runs if r["status"] == "ok"}
    if len(ok) == 2:
        sec.result["ratio"] = round(ok["llmtune"]["tokens_per_s"] / ok["transformers+peft"]["tokens_per_s"], 3)
    sec.result["status"] = "ok" if len(ok) == 2 and all(r["loss_plausible"] for r in ok.values()) else "failed"


def _qlora_peak(cfg: dict, dev: str, seq: int) -> dict:
    import torch

    t0 = time.monotonic()
    model = build_llmtune(cfg, dev, "qlora", torch.bfloat16)
    free()
    build_s = time.monotonic() - t0
    weights = round(torch.cuda.memory_allocated() / 1e9, 3) if dev == "cuda" else None
    reset_peak(dev)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg["vocab_size"], (1, seq), generator=g).to(dev)
    r = train_steps(model, {"input_ids": ids, "labels": ids}, dev, torch.bfloat16, steps=1 if dev == "cpu" else 2)
    r.update(layers=cfg["num_hidden_layers"], weights_gb=weights, peak_gb=peak_gb(dev), build_s=round(build_s, 2))
    return r


def section_qlora_8b(sec: Section) -> None:
    """Peak GPU memory of a QLoRA step on a Llama-3.1-8B-shaped model at 1024 tokens (one row, NF4 with
    double quantization on every decoder linear, bf16 embeddings and lm_head, r 16 adapters, gradient
    checkpointing, AdamW; two steps, so the optimizer state is in the peak). Measured at 2 and 4 layers
    and extrapolated linearly to 32 (``extrapolated_peak_gb``); then at all 32 layers when the cap allows
    (``measured_peak_gb``). GB = 1e9 bytes."""
    dev, dry = sec.dev, sec.dry
    full = 3 if dry else LLAMA31_8B["num_hidden_layers"]
    seq = 32 if dry else 1024
    small = [1, 2] if dry else [2, 4]
    runs: list = []
    sec.result.update(model="Llama-3.1-8B shape", seq=seq, full_layers=full, runs=runs)
    for n in small:
        if not sec.enough(8):
            sec.skip(f"{n} layers")
            continue
        guarded(sec, runs, {"layers": n}, lambda n=n: _qlora_peak(shape_config(LLAMA31_8B, dry, n), dev, seq))
    ok = [r for r in runs if r["status"] == "ok" and r["peak_gb"] is not None]
    if len(ok) == 2:
        (l1, p1), (l2, p2) = [(r["layers"], r["peak_gb"]) for r in ok]
        sec.result["per_layer_gb"] = round((p2 - p1) / (l2 - l1), 4)
        sec.result["extrapolated_peak_gb"] = round(p2 + (p2 - p1) / (l2 - l1) * (full - l2), 3)
    done = [r for r in runs if r["status"] == "ok"]
    # the full model's time: build and two steps scale with the layers; the first step's compilation is done
    est = 10 + max((r["build_s"] + 2 * r["step_ms"] / 1e3) / r["layers"] * full * 1.5 for r in done) if done else 1e9
    if sec.enough(est):
        row = guarded(sec, runs, {"layers": full},
                      lambda: _qlora_peak(shape_config(LLAMA31_8B, dry, full), dev, seq))
        if row and row["status"] == "ok":
            sec.result["measured_peak_gb"] = row["peak_gb"]
    else:
        sec.skip(f"{full} layers (estimated {est:.0f} s)")
    sec.result["status"] = "ok" if done and all(r["status"] == "ok" and r["finite"] for r in runs) else "failed"


def section_moe(sec: Section) -> None:
    """A Qwen3-30B-A3B-shaped model (128 experts of width 768, top-8, GQA 32/4) cut to 2 layers, on a
    packed 2 x 512 batch: (1) the experts of layer 0 on routed rows, grouped (``torch._grouped_mm``)
    against the per-expert loop, no autograd, bf16 (``experts_forward(grouped=True/False)``): error and
    times; (2) a LoRA step and (3) a full fine-tuning step with bf16 weights (two optimizer steps each):
    tokens/s, peak memory, losses, and how often ``torch._grouped_mm`` ran in each."""
    import torch

    from llmtune.models.moe import experts_forward, route

    dev, dry = sec.dev, sec.dry
    cfg = shape_config(QWEN3_30B_A3B, dry, layers=2)
    lengths = [[20, 12], [32]] if dry else [[200, 312], [512]]
    batch = packed_batch(lengths, cfg["vocab_size"], dev)
    runs: list = []
    sec.result.update(model="Qwen3-30B-A3B shape, 2 layers", experts=cfg["num_experts"],
                      top_k=cfg["num_experts_per_tok"], runs=runs)

    def grouped_vs_loop():
        from gpu_check_common import bench_ms

        model = build_llmtune(cfg, dev, "full_lowp", torch.bfloat16)
        mlp = model.model.layers[0].mlp
        n = sum(lengths[0]) * len(lengths)
        x = torch.randn(n, cfg["hidden_size"], device=dev, dtype=torch.bfloat16)
        counts: dict = {}
        with torch.no_grad(), count_calls(torch, "_grouped_mm", counts):
            weights, top, _ = route(mlp.gate(x), mlp.top_k, mlp.norm_topk_prob)
            got = experts_forward(x, mlp.experts, top, weights, grouped=True)
            want = experts_forward(x.double(), [e.double() for e in mlp.experts], top, weights.double(),
                                   grouped=False)
            err = rel_err(got, want)
            for e in mlp.experts:  # Module.double() converted them in place: back to bf16 (exact)
                e.to(torch.bfloat16)
            t_g = bench_ms(lambda: experts_forward(x, mlp.experts, top, weights, grouped=True), dev)
            t_l = bench_ms(lambda: experts_forward(x, mlp.experts, top, weights, grouped=False), dev)
        return {"rows": n, "max_rel_err": err, "ok": err <= 3e-2, "grouped_ms": round(t_g, 4),
                "loop_ms": round(t_l, 4), "speedup": round(t_l / t_g, 3), "grouped_mm": counts}
    guarded(sec, runs, {"run": "experts grouped vs loop (no grad)"}, grouped_vs_loop)
    for method in ("lora", "full_lowp"):
        if not sec.enough(8):
            sec.skip(method)
            continue

        def step(method=method):
            counts: dict = {}
            model = build_llmtune(cfg, dev, method, torch.bfloat16)
            free()
            reset_peak(dev)
            with count_calls(torch, "_grouped_mm", counts):
                r = train_steps(model, batch, dev, torch.bfloat16, steps=1 if dry else 2)
            r.update(peak_gb=peak_gb(dev), grouped_mm=counts, loss_plausible=_check_losses(r, cfg["vocab_size"]))
            return r
        guarded(sec, runs, {"run": f"{method} step (bf16)"}, step)
    bad = [r for r in runs if r["status"] != "ok" or r.get("ok") is False or r.get("loss_plausible") is False]
    sec.result["status"] = "failed" if bad else "ok"
