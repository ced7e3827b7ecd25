"""A vision-language LoRA training step on the CPU: llmtune vs transformers + peft, same weights, shapes, adapters.

The model is a random-init Qwen2.5-VL: the vision tower of Qwen2.5-VL-3B (width 1280, 16 heads, SwiGLU 3420,
patch 14, windows of 112 px, out width 2048) at reduced depth (``--vision-depth``, the last block with full
attention, the others windowed, as the 3B's every-8th pattern), and a short language model of the 3B's width
(hidden 2048, 16 heads, 2 key/value heads, MLP 11008) with ``--lm-layers`` layers and a ``--vocab`` vocabulary.
The parent process writes it once (transformers' ``save_pretrained``, seeded) and every worker loads that folder,
each in a fresh subprocess (so the peak RSS is its own).

Adapters: LoRA rank 8, alpha 16 on every linear layer of the decoder layers (LLaMA-Factory's ``lora_target: all``
with the default ``freeze_vision_tower``); ``--vision-lora`` also on the vision blocks (``freeze_vision_tower:
false``). Both sides use the same PEFT ``target_modules`` regex (llmtune's :func:`vl_lora_target`).
Batch: ``--batch`` rows, each one ``--image``-pixel square image (``(image/14)**2`` patches, a quarter as image
tokens) and ``--text`` text tokens, every text token a label, no padding. Step: forward, loss, backward, grad-norm
clip 1.0, AdamW (float32). ``--warmup`` untimed and ``--steps`` timed steps; ``--repeats R`` runs the
implementations in turn (A B A B ...) and the table shows medians. Tokens/s counts all tokens (image tokens too).
``CPU s`` is the process's CPU time per step (all its threads): on a machine shared with other jobs it moves far
less than the wall time, most of all with ``--threads 1`` (no OpenMP threads waiting on each other).

    python benchmarks/vlm_step.py --repeats 2 --out benchmarks/results/vlm_step.json
    python benchmarks/vlm_step.py --impl llmtune --profile /tmp/vlm_prof     # one profiled step per worker
    python benchmarks/vlm_step.py --baseline /tmp/main_tree --repeats 2      # + llmtune from another tree

``--baseline DIR`` adds the implementation ``baseline``: the llmtune worker importing ``llmtune`` from ``DIR``
(another checkout, e.g. ``git archive main llmtune | tar -x -C DIR``), run in turn with the others (before/after
comparisons on a shared machine).
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

IMPLS = ("llmtune", "hf")
IMG, VID, VSTART, VEND, PAD = 5, 6, 3, 4, 0


def make_model(args) -> None:
    """Write the random-init Qwen2.5-VL folder ``args.tmp/model`` (transformers' save_pretrained, float32)."""
    import torch
    import transformers

    torch.manual_seed(0)
    depth = args.vision_depth
    text = dict(vocab_size=args.vocab, hidden_size=2048, intermediate_size=11008, num_hidden_layers=args.lm_layers,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                bos_token_id=1, eos_token_id=2, pad_token_id=PAD, tie_word_embeddings=False)
    vision = dict(depth=depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[i for i in range(depth) if i % 8 == 7] or [depth - 1], tokens_per_second=2)
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMG,
                                        video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).float()
    model.save_pretrained(str(Path(args.tmp) / "model"))


def make_batch(args) -> dict:
    """``input_ids, attention_mask, labels`` ``(B, T)``, ``pixel_values`` ``(B * patches, 1176)``,
    ``image_grid_thw`` ``(B, 3)``: each row ``<vision_start> n x <image_pad> <vision_end>`` + text tokens."""
    import torch

    g = torch.Generator().manual_seed(1)
    side = args.image // 14
    n_img = side * side // 4
    rows, labels = [], []
    for _ in range(args.batch):
        text = torch.randint(10, args.vocab, (args.text,), generator=g).tolist()
        ids = [VSTART] + [IMG] * n_img + [VEND] + text
        rows.append(ids)
        labels.append([-100] * (n_img + 2) + text)
    ids = torch.tensor(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(labels),
            "pixel_values": torch.randn(args.batch * side * side, 3 * 2 * 14 * 14, generator=g),
            "image_grid_thw": torch.tensor([[1, side, side]] * args.batch)}


def lora_regex(model, args) -> str:
    from llmtune.models.qwen_vl import vl_lora_target

    return vl_lora_target(model, "all", vision=not args.vision_lora)


def _mark(module, label: str) -> list:
    """Hooks that wrap each forward call of ``module`` in a profiler range named ``label``."""
    import torch

    open_ranges = []

    def pre(_m, _args):
        rf = torch.profiler.record_function(label)
        rf.__enter__()
        open_ranges.append(rf)

    def post(_m, _args, _out):
        open_ranges.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def _profile(step, path: str, model) -> None:
    """One profiled step: where its time goes (vision tower forward, decoder layers forward, the rest =
    backward + lm_head/loss + optimizer), then the ops by self time, and by op and input shapes."""
    import re

    from torch.profiler import ProfilerActivity, profile

    parts = {"vision tower (forward)": [m for n, m in model.named_modules() if n.endswith("visual")][:1],
             "decoder layers (forward)": [m for n, m in model.named_modules() if re.search(r"\blayers\.\d+$", n)]}
    hooks = [h for label, mods in parts.items() for m in mods for h in _mark(m, label)]
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    wall = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    rows = {e.key: e for e in prof.key_averages()}
    lines = [f"profiled step: {wall:.2f} s wall"]
    rest = wall
    for label in list(parts) + ["Optimizer.step#AdamW.step"]:
        if label in rows:
            sec = rows[label].cpu_time_total / 1e6
            rest -= sec
            lines.append(f"  {label}: {sec:.2f} s ({rows[label].count} calls)")
    lines.append(f"  the rest (backward, lm_head + loss, embedding, M-RoPE ids): {rest:.2f} s")
    Path(path).write_text("\n".join(lines) + "\n\n"
                          + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n"
                          + prof.key_averages(group_by_input_shape=True).table(
                              sort_by="self_cpu_time_total", row_limit=80, max_name_column_width=40,
                              max_shapes_column_width=120))


def worker_llmtune(args, batch) -> tuple:
    import torch

    from llmtune.models.loader import load_model
    from llmtune.peft import apply_lora
    from llmtune.train.trainer import Trainer

    model = load_model(str(Path(args.tmp) / "model"), dtype="float32")
    torch.manual_seed(0)
    apply_lora(model, lora_rank=8, lora_alpha=16, lora_target=lora_regex(model, args), regex=True)
    n = args.warmup + args.steps
    cfg = {"stage": "sft", "output_dir": str(Path(args.tmp) / "out"), "per_device_train_batch_size": args.batch,
           "learning_rate": 1e-4, "max_steps": n, "report_to": "none", "lr_scheduler_type": "constant"}
    rows = [{"input_ids": r.tolist(), "labels": lab.tolist()} for r, lab in zip(batch["input_ids"], batch["labels"])]
    trainer = Trainer(model, cfg, rows * n, collator=lambda rs: batch)
    model.train()

    def step():
        trainer.accumulate_gradients([batch])
        trainer.optimizer_step()

    return step, sum(p.numel() for p in model.parameters() if p.requires_grad), model


def worker_hf(args, batch) -> tuple:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from llmtune.models.config import ModelConfig
    from llmtune.models.qwen_vl import QwenVL

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(Path(args.tmp) / "model"), dtype=torch.float32)
    with torch.device("meta"):   # the same regex as llmtune's, from a weightless llmtune model
        regex = lora_regex(QwenVL(ModelConfig.from_hf_dict(json.loads(
            (Path(args.tmp) / "model" / "config.json").read_text()))), args)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=regex, lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    inputs = dict(batch, mm_token_type_ids=(batch["input_ids"] == IMG).long())
    model.train()

    def step():
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params), model


def run_worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    batch = make_batch(args)
    step, trainable, model = (worker_hf if args.worker == "hf" else worker_llmtune)(args, batch)
    times, cpu = [], []
    for _ in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if args.profile:
        _profile(step, f"{args.profile}.{args.worker}.txt", model)
    tokens = int(batch["attention_mask"].sum())
    timed = times[args.warmup:]
    print("RESULT " + json.dumps({
        "impl": args.worker, "step_s": timed, "step_cpu_s": cpu[args.warmup:], "first_step_s": times[0],
        "tokens_per_step": tokens,
        "tokens_per_s": tokens * len(timed) / sum(timed), "trainable_params": trainable,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision-depth", type=int, default=4)
    ap.add_argument("--lm-layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--image", type=int, default=224, help="image side in pixels (a multiple of 28)")
    ap.add_argument("--text", type=int, default=64, help="text tokens per row")
    ap.add_argument("--vision-lora", action="store_true", help="LoRA on the vision blocks too")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--impl", default="llmtune,hf")
    ap.add_argument("--baseline", default=None, help="also run llmtune imported from this folder ('baseline')")
    ap.add_argument("--profile", default=None, help="profile one extra step; tables at PROFILE.<impl>.txt")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--worker", choices=IMPLS + ("baseline",), help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/llmtune_bench_vlm", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.image % 28:
        sys.exit("--image must be a multiple of 28 (patch 14 x merge 2)")
    if args.worker:
        run_worker(args)
        return
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    if any(i not in IMPLS for i in impls):
        sys.exit(f"--impl: use {', '.join(IMPLS)}")
    if args.baseline:
        if not (Path(args.baseline) / "llmtune" / "__init__.py").is_file():
            sys.exit(f"--baseline {args.baseline}: no llmtune/__init__.py there (extract a tree with llmtune/ into it)")
        impls.insert(0, "baseline")
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    make_model(args)
    passed = [f"--vision-depth={args.vision_depth}", f"--lm-layers={args.lm_layers}", f"--vocab={args.vocab}",
              f"--batch={args.batch}", f"--image={args.image}", f"--text={args.text}", f"--warmup={args.warmup}",
              f"--steps={args.steps}", f"--threads={args.threads}"] + (["--vision-lora"] if args.vision_lora else [])
    if args.profile:
        passed.append(f"--profile={args.profile}")
    results = []
    for _ in range(args.repeats):
        for impl in impls:
            cmd = [sys.executable, __file__, *passed, "--worker", impl, "--tmp", args.tmp]
            env = dict(os.environ)
            if impl == "baseline":
                env["PYTHONPATH"] = os.pathsep.join([str(Path(args.baseline).resolve()), env.get("PYTHONPATH", "")])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{impl} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                results.append({"impl": impl, "error": proc.stderr[-500:]})
                continue
            results.append(json.loads(line[7:]))
            print(f"  {impl}: {results[-1]['tokens_per_s']:.1f} tokens/s, peak RSS "
                  f"{results[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    summary = {}
    for impl in impls:
        ok = [r for r in results if r.get("impl") == impl and "error" not in r]
        if ok:
            summary[impl] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
                             "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in ok),
                             "step_s": statistics.median(s for r in ok for s in r["step_s"]),
                             "step_cpu_s": statistics.median(s for r in ok for s in r["step_cpu_s"]),
                             "trainable_params": ok[0]["trainable_params"]}
    print(f"\n{'impl':<10} {'tokens/s':>10} {'step s':>8} {'CPU s':>8} {'peak RSS MiB':>13} {'trainable':>11}")
    for impl, s in summary.items():
        print(f"{impl:<10} {s['tokens_per_s']:>10.1f} {s['step_s']:>8.2f} {s['step_cpu_s']:>8.2f} "
              f"{s['peak_rss_mib']:>13.0f} {s['trainable_params']:>11,}")
    if "llmtune" in summary and "hf" in summary:
        a, b = summary["llmtune"], summary["hf"]
        print(f"llmtune / transformers+peft: tokens/s x{a['tokens_per_s'] / b['tokens_per_s']:.2f}, "
              f"peak RSS x{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}")
    if "llmtune" in summary and "baseline" in summary:
        a, b = summary["llmtune"], summary["baseline"]
        print(f"llmtune / baseline ({args.baseline}): tokens/s x{a['tokens_per_s'] / b['tokens_per_s']:.2f}, "
              f"peak RSS x{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}")
    if args.out:
        settings = {k: getattr(args, k) for k in ("vision_depth", "lm_layers", "vocab", "batch", "image", "text",
                                                  "vision_lora", "warmup", "steps", "repeats", "threads")}
        settings["baseline"] = args.baseline
        Path(args.out).write_text(json.dumps({"settings": settings, "summary": summary, "runs": results,
                                              "load": os.getloadavg()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
