"""Benchmark: load time and peak resident memory of ``llmtune.load_model`` on the real model.

Each configuration runs in a fresh Python subprocess (so imports, caches and allocator state do not leak
between rows); the child reports wall time of ``load_model`` alone and its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux), plus the RSS right after ``import torch``
and the final parameter bytes, so "peak - baseline" can be compared with the model size.

Usage::

    python benchmarks/load.py [--model PATH] [--dtypes bfloat16,float32] [--repeats 1]
                              [--out benchmarks/results/load.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads({threads})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from llmtune.models.loader import load_model
t0 = time.perf_counter()
model = load_model({path!r}, dtype={dtype!r})
t1 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seen, nbytes = set(), 0
for p in model.parameters():
    if id(p) not in seen:
        seen.add(id(p)); nbytes += p.numel() * p.element_size()
print(json.dumps({{"load_s": t1 - t0, "peak_rss_mib": peak / 1024, "baseline_rss_mib": base / 1024,
                  "param_mib": nbytes / 2**20, "dtype": str(model.dtype)}}))
"""


CONVERT = r"""
import json, sys
from safetensors.torch import save_file
from llmtune.models.loader import load_model
model = load_model({path!r}, dtype="float32")
sd = {{k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
      or not model.config.tie_word_embeddings}}
save_file(sd, {out!r} + "/model.safetensors", metadata={{"format": "pt"}})
cfg = model.config.to_hf_dict(); cfg["torch_dtype"] = "float32"
open({out!r} + "/config.json", "w").write(json.dumps(cfg))
"""


def default_model() -> Path:
    repo = Path(__file__).resolve().parents[1]
    return repo.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_one(path: str, dtype: str, threads: int) -> dict:
    code = CHILD.format(path=path, dtype=dtype, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child failed for dtype={dtype}:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model()))
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-safetensors", action="store_true",
                    help="skip the rows that load a float32 safetensors copy of the model (made in a temp dir)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "load.json"))
    args = ap.parse_args(argv)
    rows = []
    sources = [args.model]
    tmp = None
    if not args.no_safetensors and args.model.endswith(".gguf"):
        import tempfile

        tmp = tempfile.TemporaryDirectory()
        subprocess.run([sys.executable, "-c", CONVERT.format(path=args.model, out=tmp.name)], check=True)
        sources.append(tmp.name)
    for source in sources:
        label = Path(source).name if source == args.model else "same model as float32 safetensors"
        for dtype in args.dtypes.split(","):
            runs = [run_one(source, dtype, args.threads) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["load_s"])
            best["overhead_mib"] = best["peak_rss_mib"] - best["baseline_rss_mib"] - best["param_mib"]
            rows.append({"model": label, "requested_dtype": dtype, "runs": len(runs), **best})
    if tmp is not None:
        tmp.cleanup()
    header = f"{'model':42s} {'dtype':9s} {'load s':>7s} {'params MiB':>10s} {'peak RSS MiB':>12s} " \
             f"{'base MiB':>8s} {'over MiB':>8s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:42s} {r['requested_dtype']:9s} {r['load_s']:7.2f} {r['param_mib']:10.1f} "
              f"{r['peak_rss_mib']:12.1f} {r['baseline_rss_mib']:8.1f} {r['overhead_mib']:8.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
