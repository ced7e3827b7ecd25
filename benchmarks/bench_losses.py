"""Chunked vocabulary projection vs plain full logits: time and peak memory of forward + backward.

Shapes of SmolLM2-135M (hidden 576, vocab 49152); each method runs in its own subprocess so the peak RSS
(ru_maxrss) belongs to it alone. Prints a table and writes benchmarks/results/bench_losses.json.

    python benchmarks/bench_losses.py [--tokens 2048] [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

H, V = 576, 49152


def _run(method: str, tokens: int, dtype: str, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from llmtune.losses import causal_lm_loss, sequence_logps

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    b = 4
    t = tokens // b
    hidden = torch.randn(b, t, H, dtype=dt, requires_grad=True)
    weight = (torch.randn(V, H) * 0.02).to(dt).requires_grad_()
    labels = torch.randint(0, V, (b, t))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        if method == "full":
            logits = (hidden @ weight.t()).float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
        elif method == "chunked":
            loss, _ = causal_lm_loss(hidden, weight, labels)
        else:  # per-token path (DPO/KTO/PPO): recompute in backward
            loss = -sequence_logps(hidden, weight, labels).sum()
        loss.backward()
        times.append(time.perf_counter() - t0)
        del loss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "tokens": tokens, "dtype": dtype, "best_s": min(times),
            "peak_extra_MiB": (peak - base) / 1024.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_run(a.child, a.tokens, a.dtype, a.repeats)))
        return
    rows = []
    for method in ("full", "chunked", "seq_logps"):
        out = subprocess.run([sys.executable, __file__, "--child", method, "--tokens", str(a.tokens),
                              "--dtype", a.dtype, "--repeats", str(a.repeats)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'method':<10} {'tokens':>6} {'dtype':>9} {'fwd+bwd s':>10} {'peak extra MiB':>15}")
    for r in rows:
        print(f"{r['method']:<10} {r['tokens']:>6} {r['dtype']:>9} {r['best_s']:>10.3f} {r['peak_extra_MiB']:>15.0f}")
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results", "bench_losses.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
