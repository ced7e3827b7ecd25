"""Benchmark: MoE expert compute, llmtune's sorted/grouped dispatch vs reference loops, on this machine.

One sparse layer's experts (``SwiGLU`` experts, top-k routing from random router logits), three ways:

* ``per_token``: the naive loop over tokens and their k experts (three matrix-vector products each), run on
  ``--token_loop_tokens`` tokens only and scaled to the full token count (it is that slow);
* ``mask_loop``: the reference implementation's loop over the experts that got tokens, each finding its
  tokens with a one-hot mask and ``torch.where``, then ``index_add`` (transformers' eager Qwen-MoE experts);
* ``sorted`` (llmtune, :func:`llmtune.models.moe.experts_forward`): assignments sorted by expert once, rows
  gathered once, each expert one call on its contiguous rows, one ``index_add``;
* ``grouped``: the same dispatch with the three projections as ``torch._grouped_mm`` products over stacked
  expert weights (what llmtune uses on CUDA with bfloat16), timed wherever the installed torch has it.

Forward (no grad) and forward + backward (gradients to the expert weights and the input) are timed, the
median of ``--repeats`` runs after a warm-up; the outputs of the three ways are compared (max abs
difference). Defaults are half of Qwen3-30B-A3B's layer (hidden 2048 -> 1024, expert width 768 -> 384,
128 -> 64 experts, top-8) so a run fits a shared 2-core CPU in about a minute; timings on a shared
machine are noisy (the load average is recorded).

Usage::

    python benchmarks/moe_experts.py [--hidden 1024] [--width 384] [--experts 64] [--top_k 8]
        [--tokens 1024] [--dtype float32] [--repeats 3] [--out benchmarks/results/moe_experts.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmtune.models.moe import ExpertMLP, experts_forward


def per_token(x, experts, top, weights):
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        acc = torch.zeros_like(x[n])
        for j in range(top.shape[1]):
            acc = acc + weights[n, j] * experts[int(top[n, j])](x[n:n + 1])[0]
        out[n] = acc
    return out


def mask_loop(x, experts, top, weights):
    out = torch.zeros_like(x)
    mask = F.one_hot(top, num_classes=len(experts)).permute(2, 1, 0)  # (E, k, N)
    hit = (mask.sum(dim=(1, 2)) > 0).nonzero().flatten().tolist()
    for e in hit:
        slot, tok = torch.where(mask[e])
        y = experts[e](x[tok]) * weights[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def sorted_dispatch(x, experts, top, weights):
    return experts_forward(x, experts, top, weights, grouped=False)


def grouped_dispatch(x, experts, top, weights):
    return experts_forward(x, experts, top, weights, grouped=True)


def timed(fn, x, experts, top, weights, backward: bool, repeats: int) -> float:
    def once():
        if backward:
            xi = x.detach().requires_grad_(True)
            fn(xi, experts, top, weights).float().square().mean().backward()
        else:
            with torch.no_grad():
                fn(x, experts, top, weights)
        if x.is_cuda:
            torch.cuda.synchronize()

    once()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
        experts.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top_k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--token_loop_tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_experts.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(ExpertMLP(args.hidden, args.width) for _ in range(args.experts)).to(dev, dtype)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(args.tokens, args.hidden, device=dev, dtype=dtype)
    logits = torch.randn(args.tokens, args.experts, device=dev)
    w, top = torch.topk(torch.softmax(logits, -1), args.top_k, dim=-1)
    w = w.to(dtype)

    ways = {"mask_loop": mask_loop, "sorted": sorted_dispatch}
    if hasattr(torch, "_grouped_mm"):  # forced on, also where llmtune would not choose it (CPU, float32)
        ways["grouped"] = grouped_dispatch
    with torch.no_grad():
        ref = mask_loop(x, experts, top, w).float()
        diffs = {name: float((fn(x, experts, top, w).float() - ref).abs().max()) for name, fn in ways.items()}
        n = args.token_loop_tokens
        diffs["per_token"] = float((per_token(x[:n], experts, top[:n], w[:n]).float() - ref[:n]).abs().max())

    rows = []
    for backward in (False, True):
        n = args.token_loop_tokens
        t_tok = timed(per_token, x[:n], experts, top[:n], w[:n], backward, 1) * args.tokens / n
        rows.append({"way": "per_token", "backward": backward, "seconds": t_tok, "scaled_from_tokens": n})
        for name, fn in ways.items():
            rows.append({"way": name, "backward": backward,
                         "seconds": timed(fn, x, experts, top, w, backward, args.repeats)})
    base = {r["backward"]: r["seconds"] for r in rows if r["way"] == "mask_loop"}
    print(f"MoE experts: {args.tokens} tokens x top-{args.top_k} of {args.experts} experts, hidden {args.hidden}, "
          f"width {args.width}, {args.dtype} on {dev}")
    print(f"{'way':<10} {'pass':<9} {'ms':>10} {'vs mask_loop':>13} {'max|diff|':>10}")
    for r in rows:
        r["speedup_vs_mask_loop"] = base[r["backward"]] / r["seconds"]
        print(f"{r['way']:<10} {'fwd+bwd' if r['backward'] else 'fwd':<9} {1000 * r['seconds']:>10.1f} "
              f"{r['speedup_vs_mask_loop']:>12.2f}x {diffs[r['way']]:>10.2e}")
    result = {
        "benchmark": "moe_experts", "config": vars(args), "rows": rows, "max_abs_diff_vs_mask_loop": diffs,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "loadavg": os.getloadavg(), "device_name": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
