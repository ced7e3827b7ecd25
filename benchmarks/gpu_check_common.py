"""Shared pieces of the GPU check (``benchmarks/gpu_check.py``): the section context, timing, memory,
model shapes, model building and the packed training step.

Nothing here imports torch at module import: the orchestrator imports this file without starting CUDA.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

# Hugging Face config.json contents of the shapes (public architecture facts, no weights).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "head_dim": 128,
    "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001,
}
LLAMA32_1B = dict(LLAMA31_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                  tie_word_embeddings=True,
                  rope_scaling=dict(LLAMA31_8B["rope_scaling"], factor=32.0))
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48, "vocab_size": 151936,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 48, "router_aux_loss_coef": 0.001,
    "bos_token_id": 151643, "eos_token_id": 151645,
}
#: what ``--dry-run`` puts over every shape: tiny widths, GQA kept (4 query heads, 2 key/value heads)
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 512}
TINY_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def shape_config(base: dict, dry: bool, layers: Optional[int] = None) -> dict:
    """``base`` with ``layers`` decoder layers, tiny widths under ``dry`` (MoE: 8 experts of width 32)."""
    cfg = dict(base)
    if dry:
        cfg.update(TINY)
        if cfg.get("num_experts"):
            cfg.update(TINY_MOE)
        if cfg.get("rope_scaling"):
            cfg["rope_scaling"] = dict(cfg["rope_scaling"], original_max_position_embeddings=64)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
        if "max_window_layers" in cfg:
            cfg["max_window_layers"] = layers
    return cfg


class Section:
    """One section's run: its JSON file (rewritten by :meth:`save`), its time cap and its device.

    ``result`` is the dict written to ``<out>/<name>.json``; ``status`` starts as ``"running"`` (what a
    killed run leaves); the section sets ``ok`` or ``failed``, ``gpu_check.run_child`` ``error`` when it
    raises and ``partial`` when it skipped work for lack of time, and the parent ``timeout``/``crashed``."""

    def __init__(self, name: str, out_dir: Path, cap_s: float, dry: bool) -> None:
        import torch

        self.name, self.out_dir, self.cap_s, self.dry = name, Path(out_dir), float(cap_s), dry
        self.dev = "cuda" if torch.cuda.is_available() and not dry else "cpu"
        self.start = time.monotonic()
        self.result: dict[str, Any] = {"section": name, "status": "running", "dry_run": dry, "device": self.dev,
                                       "cap_s": self.cap_s}
        self.save()

    def left(self) -> float:
        """Seconds left of this section's cap."""
        return self.cap_s - (time.monotonic() - self.start)

    def enough(self, need_s: float) -> bool:
        """Whether ``need_s`` seconds are left (always True in a dry run: every code path runs there)."""
        return self.dry or self.left() >= need_s

    def skip(self, what: str) -> None:
        """Record that ``what`` was not run for lack of time."""
        self.result.setdefault("skipped", []).append(f"{what} ({self.left():.0f} s of the cap left)")
        self.save()

    def save(self) -> None:
        self.result["seconds"] = round(time.monotonic() - self.start, 2)
        path = self.out_dir / f"{self.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        os.replace(tmp, path)


def error_info(exc: BaseException) -> dict:
    """``{"error": "Type: message", "traceback": last lines}`` of an exception (for a section's JSON)."""
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"error": f"{type(exc).__name__}: {exc}"[:600], "traceback": "".join(tb)[-2500:]}


def guarded(sec: Section, rows: list, label: dict, fn: Callable[[], dict]) -> Optional[dict]:
    """Run ``fn`` (one measurement), append ``{**label, **fn()}`` to ``rows`` (status ``ok``) or, when it
    raises, ``{**label, "status": "error"|"oom", error, traceback}``; save the section either way."""
    import torch

    try:
        row = {**label, "status": "ok", **fn()}
    except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError) as e:
        row = {**label, "status": "oom", **error_info(e)}
    except Exception as e:  # noqa: BLE001 (recorded; the next measurement runs)
        row = {**label, "status": "error", **error_info(e)}
    rows.append(row)
    free()
    sec.save()
    return row


def sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    """Collect garbage and return cached GPU memory (between measurements); a no-op without a GPU, where a
    full collection of a process that imported transformers costs half a second."""
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def reset_peak(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(dev: str) -> Optional[float]:
    """Peak allocated GPU memory since the last :func:`reset_peak`, in GB (1e9 bytes); None on the CPU."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 1e9, 3) if dev == "cuda" else None


def bench_ms(fn: Callable[[], Any], dev: str, rep_ms: int = 25) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA (L2 flushed between calls,
    so weight streaming is measured from memory, as in decoding); two wall-clock calls on the CPU."""
    if dev == "cuda":
        import triton.testing as tt

        return float(tt.do_bench(fn, warmup=5, rep=rep_ms, return_mode="median"))
    fn()
    ts = []
    for _ in range(2):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def rel_err(got, want) -> float:
    """``max |got - want| / max |want|`` in float64 (on the tensors' device)."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / (want.abs().max() + 1e-12))


# ----------------------------------------------------------------------------------------------------
# models and steps
# ----------------------------------------------------------------------------------------------------

def build_llmtune(cfg: dict, dev: str, method: str, dtype: "Any", lora_rank: int = 16,
                  checkpointing: Optional[bool] = None):
    """A random-init llmtune ``Transformer`` of ``cfg`` on ``dev`` set up as the trainer would for
    ``method`` (``lora``: base in ``dtype``, float32 adapters on every decoder linear, r ``lora_rank``,
    alpha 2r; ``qlora``: decoder linears quantized to NF4 with double quantization, compute dtype ``dtype``,
    gradient checkpointing; ``full``: float32 weights, all trainable; ``full_lowp``: weights in ``dtype``,
    all trainable). Returns the model in train mode."""
    import torch

    from llmtune.models import ModelConfig, Transformer
    from llmtune.peft import apply_lora

    mcfg = ModelConfig.from_hf_dict(cfg)
    base_dtype = torch.float32 if method == "full" else dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(base_dtype)
    try:
        with torch.device(dev):
            torch.manual_seed(0)
            model = Transformer(mcfg)
    finally:
        torch.set_default_dtype(old)
    for m in model.modules():  # N(0, 0.02) as Hugging Face's initializer_range: a random model's first
        if isinstance(m, torch.nn.Embedding):  # loss is then near ln(vocab), also with tied embeddings
            torch.nn.init.normal_(m.weight, std=0.02)
    model.inv_freq = model.inv_freq.float()
    if method == "qlora":
        from llmtune.models.loader import quantize_model

        quantize_model(model, compute_dtype=dtype)
        free()
    if checkpointing if checkpointing is not None else method == "qlora":
        model.gradient_checkpointing_enable()
    if method in ("lora", "qlora"):
        model.requires_grad_(False)
        apply_lora(model, lora_rank=lora_rank, lora_alpha=2 * lora_rank, lora_target="all")
    else:
        model.requires_grad_(True)
    model.train()
    return model


def packed_batch(lengths: list[list[int]], vocab: int, dev: str, pad: bool = False) -> dict:
    """A multi-row batch of packed segments: row ``i`` holds segments of ``lengths[i]`` tokens, as the
    collator packs them: ``attention_mask`` the segment ids 1, 2, ... of the row, ``position_ids``
    restarting at 0 in each segment, ``labels`` = ``input_ids`` with -100 at each segment's first token (no
    segment predicts the next one's first token). All ``(B, T)`` int64. Without ``pad`` every row must have
    the same total (padding-free); with it shorter rows are right-padded (mask 0, labels -100).
    Raises ValueError for rows of different totals without ``pad``."""
    import torch

    total = max(sum(r) for r in lengths)
    if not pad and len({sum(r) for r in lengths}) != 1:
        raise ValueError(f"packed_batch: rows must have one total length, got {[sum(r) for r in lengths]}")
    g = torch.Generator().manual_seed(0)
    ids, mask, pos = [], [], []
    for row in lengths:
        fill = total - sum(row)
        ids.append(torch.cat([torch.randint(0, vocab, (sum(row),), generator=g), torch.zeros(fill, dtype=torch.long)]))
        mask.append(torch.cat([torch.full((n,), i + 1) for i, n in enumerate(row)] + [torch.zeros(fill)]).long())
        pos.append(torch.cat([torch.arange(n) for n in row] + [torch.zeros(fill, dtype=torch.long)]))
    input_ids = torch.stack(ids)
    attention_mask = torch.stack(mask)
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    for b, row in enumerate(lengths):
        starts = [sum(row[:i]) for i in range(len(row))]
        labels[b, starts] = -100
    return {k: v.to(dev) for k, v in {"input_ids": input_ids, "attention_mask": attention_mask,
                                      "position_ids": torch.stack(pos), "labels": labels}.items()}


def train_steps(model, batch: dict, dev: str, amp_dtype, steps: int, hf: bool = False) -> dict:
    """``steps`` optimizer steps (forward, summed loss / label tokens, backward, AdamW) on ``batch``, as the
    trainer runs them: autocast in ``amp_dtype`` on CUDA and a GradScaler for float16. The first step is
    the warm-up (kernel compilation, autotuning); timings are of the later ones (of the first when
    ``steps == 1``). ``hf``: a transformers model (``model(input_ids, attention_mask, labels).loss``).
    Returns step_ms, tokens_per_s, the losses, the gradient norms (before unscaling is undone: true
    norms), ``finite`` (every loss finite) and ``skipped_steps`` (steps whose gradients were not finite: the
    GradScaler skips them under float16, which is expected while it lowers its scale)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    scaler = torch.amp.GradScaler(dev, enabled=dev == "cuda" and amp_dtype == torch.float16)
    mask = batch.get("attention_mask")
    tokens = int(batch["input_ids"].numel() if mask is None else (mask != 0).sum())  # padding not counted
    times, losses, norms = [], [], []
    for i in range(steps):
        sync(dev)
        t = time.perf_counter()
        with torch.autocast(dev, dtype=amp_dtype, enabled=dev == "cuda"):
            if hf:
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            else:
                from llmtune.losses import causal_lm_loss

                hidden = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                               position_ids=batch.get("position_ids"))
                loss_sum, n = causal_lm_loss(hidden, model.lm_head.weight, batch["labels"])
                loss = loss_sum / n
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1e9)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        times.append(time.perf_counter() - t)
        losses.append(round(float(loss.detach()), 4))
        norms.append(float(gnorm))
    del opt
    timed = times[1:] or times
    sec = statistics.median(timed)
    return {"step_ms": round(sec * 1e3, 2), "first_step_s": round(times[0], 2),
            "tokens_per_s": round(tokens / sec, 1), "tokens": tokens, "losses": losses,
            "grad_norms": [round(n, 4) for n in norms], "finite": all(math.isfinite(x) for x in losses),
            "skipped_steps": sum(not math.isfinite(n) for n in norms)}
