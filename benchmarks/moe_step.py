"""MoE LoRA training step: llmtune against transformers + peft on a Qwen3-MoE-shaped random-init model.

The main process builds one random-init ``Qwen3MoeForCausalLM`` (transformers, bfloat16, seed 0) from a
Qwen3-30B-A3B-shaped config with fewer layers and experts (defaults: 2 layers, hidden 1024, 64 experts of width
768, top-8, 16 query / 4 key-value heads of 64, vocabulary 32768) and saves it (safetensors); every worker
loads that same folder in a fresh subprocess (so peak RSS is its own), adds LoRA (rank 8, alpha 16, trainable
parameters in float32) and runs ``--warmup`` untimed and ``--steps`` timed AdamW steps on one fixed random
batch (``--batch`` x ``--seq`` tokens, every token a label) under bfloat16 autocast, with the router's
load-balancing loss on (``output_router_logits``, coefficient 0.001) on both sides.

Implementations (``--impl``, comma list):

* ``llmtune``: LoRA on attention and on every expert projection (``lora_target: all`` = q/k/v/o and
  ``gate_proj, up_proj, down_proj`` inside the experts; the routers are not targets);
* ``llmtune-attn``: LoRA on attention only (q/k/v/o), the same adapters as ``hf-attn``;
* ``llmtune-loop``: as ``llmtune`` with the grouped expert path switched off (the per-expert loop of earlier
  versions; ``LLMTUNE_MOE_GROUPED=0``), for before/after numbers in the same run;
* ``llmtune-before``: as ``llmtune``, importing llmtune from the source tree given by ``--before`` (e.g. an
  older commit from ``git archive``), for before/after numbers in one run;
* ``hf-attn``: transformers + peft, ``target_modules`` q/k/v/o (peft's ``target_modules`` cannot reach
  transformers 5's fused 3-D expert parameters);
* ``hf-experts``: transformers + peft with q/k/v/o plus ``target_parameters`` on ``mlp.experts.gate_up_proj``
  and ``mlp.experts.down_proj`` (peft's ``ParamWrapper``: one rank-8 LoRA per expert on the fused gate+up
  weight, so the gate and up projections share A; llmtune's adapters have separate A for gate and up).

transformers runs its default experts implementation (``config._experts_implementation``, recorded; 5.x
picks ``grouped_mm`` where torch has it) with sdpa attention. With ``--repeats R`` the list runs R times in
turn (A B A B ...), which spreads the noise of a shared machine over every implementation; the table shows
medians. ``--profile PREFIX`` writes a torch.profiler table of one extra step per worker, headed by a summary of
its self CPU time by where it comes from (``_category``: lm_head, experts' base, LoRA/router and attention
products, sdpa, the loss's passes over the logits, other ops by name).

    python benchmarks/moe_step.py --repeats 2 --out benchmarks/results/moe_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("llmtune", "llmtune-attn", "llmtune-loop", "llmtune-before", "hf-attn", "hf-experts")
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _config(args):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        moe_intermediate_size=args.width, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads, num_experts=args.experts,
        num_experts_per_tok=args.top_k, norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.001,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_checkpoint(args, folder: Path) -> None:
    """Random-init transformers model (seed 0, std 0.02 as transformers initialises), saved in bfloat16."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(_config(args)).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)


def _batch(args, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=g)
    return ids


def _category(name: str, shapes: list, args) -> str:
    """Where one profiled op's time comes from, by its name and input shapes at the benchmark's sizes: the
    vocabulary projection (a ``vocab``-wide operand), LoRA and router products (an operand dimension of at most
    2 x rank = 16 or the expert count), the experts' base products (``width`` or 2 x ``width`` wide), the
    attention projections (other products), the loss's elementwise passes (``vocab``-wide tensors), else the
    op's own name."""
    dims = [d for s in shapes for d in (s if isinstance(s, list) else [])]
    if name in ("aten::mm", "aten::addmm_", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"):
        if args.vocab in dims:
            return "matmul: lm_head (loss)"
        if dims and min(dims) <= max(16, args.experts):
            return "matmul: LoRA factors, router"
        if args.width in dims or 2 * args.width in dims:
            return "matmul: experts' base weights"
        return "matmul: attention projections"
    if "scaled_dot_product" in name:
        return "attention (sdpa)"
    if args.vocab in dims:
        return "loss: float32 passes over logits"
    return name


def _profile(step, path: str, args) -> None:
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    by_shape = prof.key_averages(group_by_input_shape=True)
    cats, total = Counter(), 0.0
    for ev in by_shape:
        total += ev.self_cpu_time_total / 1e6
        cats[_category(ev.key, ev.input_shapes, args)] += ev.self_cpu_time_total / 1e6
    summary = [f"{'where (self CPU)':45s} {'s':>7s} {'%':>6s}"] + [
        f"{k:45s} {v:7.3f} {100 * v / max(total, 1e-9):6.1f}" for k, v in cats.most_common(25)]
    Path(path).write_text("\n".join(summary) + f"\ntotal {total:.3f} s\n\n"
                          + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45) + "\n\n"
                          + by_shape.table(sort_by="self_cpu_time_total", row_limit=30))


def _time_steps(step, args) -> list[float]:
    """Wall seconds of each step; the process CPU seconds of each (all threads, a measure of the work done
    that a loaded machine disturbs less than the wall time) go to ``args.cpu_s``."""
    times, args.cpu_s = [], []
    for _ in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        args.cpu_s.append(time.process_time() - c0)
    if args.profile:
        _profile(step, f"{args.profile}.{args.worker}.txt", args)
    return times


def worker_llmtune(args) -> dict:
    import torch

    from llmtune.models.loader import load_model
    from llmtune.peft import apply_lora
    from llmtune.train.trainer import Trainer

    if args.worker == "llmtune-loop":
        os.environ["LLMTUNE_MOE_GROUPED"] = "0"
    model = load_model(args.ckpt, dtype="bfloat16")
    torch.manual_seed(0)
    target = ",".join(ATTN) if args.worker == "llmtune-attn" else "all"   # llmtune-before: as llmtune
    apply_lora(model, lora_rank=8, lora_alpha=16, lora_target=target)
    ids = _batch(args, model.config.vocab_size)
    rows = [{"input_ids": r.tolist(), "attention_mask": [1] * args.seq, "labels": r.tolist()} for r in ids]
    cfg = {"stage": "sft", "output_dir": str(Path(args.tmp) / args.worker), "per_device_train_batch_size": args.batch,
           "learning_rate": 1e-4, "max_steps": args.warmup + args.steps + 1, "bf16": True, "report_to": "none",
           "lr_scheduler_type": "constant"}
    trainer = Trainer(model, cfg, rows)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model.train()

    def step():
        trainer.accumulate_gradients([batch])
        trainer.optimizer_step()

    import llmtune

    return {"step_s": _time_steps(step, args), "llmtune": str(Path(llmtune.__file__).parent),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def worker_hf(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.bfloat16, attn_implementation="sdpa")
    impl = getattr(model.config, "_experts_implementation", None)
    torch.manual_seed(0)
    extra = {}
    if args.worker == "hf-experts":
        extra["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ATTN, lora_dropout=0.0,
                                             task_type="CAUSAL_LM", **extra))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = _batch(args, model.config.vocab_size)
    mask = torch.ones_like(ids)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"step_s": _time_steps(step, args), "experts_implementation": impl,
            "trainable": sum(p.numel() for p in params)}


def run_worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    res = (worker_hf if args.worker.startswith("hf") else worker_llmtune)(args)
    timed = res["step_s"][args.warmup:]
    res["cpu_s"] = args.cpu_s
    res["cpu_s_per_step"] = statistics.median(args.cpu_s[args.warmup:])
    res.update({"impl": args.worker, "tokens_per_s": args.batch * args.seq * len(timed) / sum(timed),
                "first_step_s": res["step_s"][0], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "threads": torch.get_num_threads(), "load_avg": os.getloadavg()})
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=768, help="moe_intermediate_size")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top_k", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv_heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="run the implementations in turn this many times")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--impl", default="llmtune,llmtune-attn,hf-attn,hf-experts",
                    help=f"comma list of {', '.join(IMPLS)}")
    ap.add_argument("--profile", default=None, help="profile one extra step per worker; tables go to PREFIX.IMPL.txt")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--tmp", default="/tmp/llmtune_bench_moe")
    ap.add_argument("--before", default=None, help="llmtune source tree of the llmtune-before implementation")
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        sys.exit(f"--impl: unknown {bad}; use {', '.join(IMPLS)}")
    tmp = Path(args.tmp)
    ckpt = tmp / f"qwen3moe_{args.layers}l_{args.hidden}h_{args.experts}e_{args.width}w_{args.vocab}v"
    if not (ckpt / "config.json").is_file():
        ckpt.mkdir(parents=True, exist_ok=True)
        make_checkpoint(args, ckpt)
    passthrough = ["--layers", "--hidden", "--width", "--experts", "--top_k", "--heads", "--kv_heads", "--vocab",
                   "--batch", "--seq", "--warmup", "--steps", "--threads", "--tmp"]
    results = []
    for rep in range(args.repeats):
        for impl in impls:
            cmd = [sys.executable, __file__, "--worker", impl, "--ckpt", str(ckpt)]
            for flag in passthrough:
                cmd += [flag, str(getattr(args, flag[2:]))]
            if args.profile:
                cmd += ["--profile", args.profile]
            env = dict(os.environ)
            if impl == "llmtune-before":
                if not args.before:
                    sys.exit("--impl llmtune-before needs --before SRC (an llmtune source tree)")
                env["PYTHONPATH"] = str(Path(args.before).resolve())
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{impl} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                results.append({"impl": impl, "error": proc.stderr[-800:]})
                continue
            r = json.loads(line[7:])
            results.append(r)
            print(f"  run {rep + 1} {impl:13s}: {r['tokens_per_s']:.1f} tokens/s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                  f"steps {', '.join(f'{s:.2f}' for s in r['step_s'])} s, CPU s/step {r['cpu_s_per_step']:.1f}, "
                  f"load {r['load_avg'][0]:.1f}",
                  file=sys.stderr, flush=True)
    med = {}
    for impl in impls:
        rs = [r for r in results if r["impl"] == impl and "error" not in r]
        if rs:
            med[impl] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                         "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
                         "cpu_s_per_step": statistics.median(r["cpu_s_per_step"] for r in rs),
                         "trainable": rs[0]["trainable"], "runs": len(rs)}
    print(f"\nMoE LoRA step (rank 8, bf16 autocast): Qwen3-MoE-shaped random init, {args.layers} layers, hidden "
          f"{args.hidden}, {args.experts} experts x {args.width}, top-{args.top_k}; batch {args.batch} x {args.seq}; "
          f"{args.steps} timed steps after {args.warmup} warm-up; medians of {args.repeats} interleaved run(s)")
    print(f"{'implementation':14s} | {'adapters on':22s} | {'trainable':>10s} | {'tokens/s':>8s} | {'peak MiB':>8s}")
    where = {"llmtune": "attention + experts", "llmtune-attn": "attention", "llmtune-loop": "attention + experts",
             "llmtune-before": "attention + experts",
             "hf-attn": "attention", "hf-experts": "attention + experts(*)"}
    for impl in impls:
        m = med.get(impl)
        if m is None:
            print(f"{impl:14s} | failed")
            continue
        print(f"{impl:14s} | {where[impl]:22s} | {m['trainable']:10d} | {m['tokens_per_s']:8.1f} | {m['peak_rss_mib']:8.0f}")
    ratios = {}
    for ours, theirs in (("llmtune", "hf-experts"), ("llmtune", "hf-attn"), ("llmtune-attn", "hf-attn"),
                         ("llmtune", "llmtune-loop"), ("llmtune", "llmtune-before"), ("llmtune-before", "hf-experts")):
        if ours in med and theirs in med:
            ratios[f"{ours}/{theirs}"] = {
                "speed": med[ours]["tokens_per_s"] / med[theirs]["tokens_per_s"],
                "peak_rss": med[ours]["peak_rss_mib"] / med[theirs]["peak_rss_mib"],
                "cpu_per_step": med[ours]["cpu_s_per_step"] / med[theirs]["cpu_s_per_step"]}
            print(f"{ours} / {theirs}: {ratios[f'{ours}/{theirs}']['speed']:.2f}x tokens/s, "
                  f"{ratios[f'{ours}/{theirs}']['peak_rss']:.2f}x peak RSS, "
                  f"{ratios[f'{ours}/{theirs}']['cpu_per_step']:.2f}x CPU seconds per step")
    print("(*) peft's ParamWrapper on the fused gate_up_proj: gate and up share one A per expert")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "ckpt")},
            "medians": med, "ratios": ratios, "results": results}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
