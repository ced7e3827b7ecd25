"""Benchmark: where a llmtune GRPO step's time goes, with wall-clock timers around each phase.

The job is issue 28's: ``examples/grpo_lora.yaml`` (the real 135M model, LoRA r16 on all linear layers, bf16
autocast, 2 prompts x ``num_generations`` 4, beta 0.04 so the reference log-probs are computed,
``num_iterations`` 1) with ``max_completion_length`` ``--new-tokens`` (48) for ``--steps`` steps. Phases (seconds
per step, wall clock, each the sum of its calls in the step):

* ``rollout``: :func:`llmtune.rollout.generate_rollouts` in all, of which ``prefill`` (the engine's packed
  prompt forwards, ``Engine._prefill``) and ``decode`` (its one-token forwards, ``Engine._decode``); the rest
  is token selection, bookkeeping and the rollout tensors;
* ``rewards``: the reward functions (:func:`llmtune.rewards.compute_rewards`);
* ``ref_logps`` / ``old_logps``: the reference and old-policy forwards (``GRPOStage._logps``);
* ``loss_fwd``: the training forward + loss (``GRPOStage.loss``); ``backward``: the rest of
  ``Trainer.accumulate_gradients`` (the backward passes); ``optimizer``: ``Trainer.optimizer_step`` (clip + AdamW);
* ``step``: the whole step (``Trainer.next_step`` + ``Trainer.train_step``); ``other``: step minus the phases.

``--variants`` runs several configurations (JSON: name -> extra config keys), interleaved ``--repeats`` times in
one process (A, B, A, B...), for before/after figures on the same machine state; ``"_cast_frozen": false`` runs
rollouts without :func:`llmtune.train.precision.frozen_weights_cast` (autocast casting every call), ``"_merge":
false`` rollouts with the LoRA products at every step (no merged weights), ``"_sdpa_decode": true`` decode steps
with torch's SDPA instead of the one-query attention, ``"_pack": false`` rollouts without oneDNN-prepacked
weights, ``"_fuse": false`` packed rollouts with separate q/k/v and gate/up products (no fused
``packed_qkv``/``packed_gate_up``), ``"_bf16_attend": true`` the one-query decode attention's products under
autocast (bfloat16, the cache recast per call: before session 7), ``"_draw": "multinomial"`` rollout tokens drawn
with ``torch.multinomial`` (generate's draw), ``"_share": false`` training forwards with a prompt copy per
completion (no shared prompts). The load average is recorded: on a shared machine timings are noisy.

Usage (from the repository root)::

    python benchmarks/grpo_profile.py [--steps 12] [--new-tokens 48] [--repeats 1]
        [--variants '{"packed": {"padding_free": true}, "padded": {"padding_free": false}}']
        [--out benchmarks/results/grpo_profile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
_ONE_QUERY = None   # llmtune's one-query decode attention, saved by main() before any variant replaces it
_FUSE = None        # llmtune.train.precision._fuse_projections, saved by main() ("_fuse": false replaces it)
_DRAW: list = [None]   # a variant's rollout draw ("multinomial" / "inverse_cdf"); None = llmtune's own
PHASES = ("rollout", "prefill", "decode", "rewards", "ref_logps", "old_logps", "loss_fwd", "backward", "optimizer")


class Timers:
    """Per-step sums of phase times, filled by the wrappers :func:`install` puts around llmtune's methods."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.cur: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, owner, name, phase_of):
        """Replace ``owner.name`` by a timed call; ``phase_of(args, kwargs)`` names the phase."""
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                if self.on:
                    self.cur[phase_of(args, kwargs)] += time.perf_counter() - t0
        setattr(owner, name, timed)
        return real


def install(t: Timers) -> None:
    """Put the timers around the engine, the GRPO stage and the trainer (this process only)."""
    from llmtune.engine import Engine
    from llmtune.train.stages import grpo
    from llmtune.train.trainer import Trainer

    t.wrap(Engine, "_prefill", lambda a, k: "prefill")
    t.wrap(Engine, "_decode", lambda a, k: "decode")
    t.wrap(grpo, "generate_rollouts", lambda a, k: "rollout")
    t.wrap(grpo, "compute_rewards", lambda a, k: "rewards")
    t.wrap(grpo.GRPOStage, "_logps", lambda a, k: "ref_logps" if a[7] else "old_logps")
    t.wrap(grpo.GRPOStage, "loss", lambda a, k: "loss_fwd")
    t.wrap(Trainer, "accumulate_gradients", lambda a, k: "_accumulate")
    t.wrap(Trainer, "optimizer_step", lambda a, k: "optimizer")
    real_next, real_train = Trainer.next_step, Trainer.train_step
    real_init = Engine.__init__

    def engine_init(self, *args, **kwargs):   # a variant's "_draw" replaces the rollout engine's draw
        if _DRAW[0] is not None and "draw" in kwargs:
            kwargs["draw"] = _DRAW[0]
        real_init(self, *args, **kwargs)
    Engine.__init__ = engine_init

    def next_step(self, steps):
        t.on, t.cur, t.t0 = True, defaultdict(float), time.perf_counter()
        return real_next(self, steps)

    def train_step(self, step):
        out = real_train(self, step)
        c = t.cur
        c["step"] = time.perf_counter() - t.t0
        c["backward"] = c.pop("_accumulate", 0.0) - c.get("loss_fwd", 0.0)
        c["other"] = c["step"] - sum(c.get(p, 0.0) for p in PHASES if p not in ("prefill", "decode"))
        t.steps.append(dict(c))
        t.on = False
        return out

    Trainer.next_step, Trainer.train_step = next_step, train_step


def _sdpa_one_query(q, k, v, mask):
    """A decode step's attention as before the one-query path: torch's SDPA (``"_sdpa_decode": true``)."""
    import torch.nn.functional as F

    k, v = k.to(q.dtype), v.to(q.dtype)   # the CPU slot cache holds float32 keys/values
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]).transpose(1, 2)


def _bf16_one_query(q, k, v, mask):
    """The one-query attention with autocast back on inside (``"_bf16_attend": true``): bfloat16 products."""
    import torch

    torch.set_autocast_enabled("cpu", True)
    try:
        return _ONE_QUERY(q, k, v, mask)
    finally:
        torch.set_autocast_enabled("cpu", False)


def run_job(a: argparse.Namespace, extra: dict, t: Timers) -> list[dict[str, float]]:
    """One training run of the job; returns its per-step phase times."""
    from llmtune.train.setup import run_train

    cfg = yaml.safe_load((ROOT / "examples" / "grpo_lora.yaml").read_text())
    cfg["model_name_or_path"] = str(Path(a.model).resolve())
    cfg["dataset_dir"] = str(ROOT / "examples" / "data")
    cfg["reward_funcs"] = ",".join(f"{ROOT / 'examples' / 'rewards.py'}:{f}" for f in ("correct_sum", "brevity"))
    cfg.update(max_completion_length=a.new_tokens, max_steps=a.steps, plot_loss=False, disable_tqdm=True,
               overwrite_output_dir=True)
    from llmtune.train.stages.grpo import GRPOStage

    GRPOStage.cast_frozen = bool(extra.get("_cast_frozen", True))   # "_cast_frozen": false = the rollout before
    GRPOStage.merge_adapters = bool(extra.get("_merge", True))       # "_merge": false = LoRA products per step
    GRPOStage.pack_weights = bool(extra.get("_pack", True))          # "_pack": false = plain bf16 weights
    _DRAW[0] = extra.get("_draw")                                    # "_draw": the rollout engine's draw
    GRPOStage.share_prompts = bool(extra.get("_share", True))        # "_share": false = a prompt copy per row
    from llmtune.models import transformer

    transformer._attend_one_query = _sdpa_one_query if extra.get("_sdpa_decode") else \
        _bf16_one_query if extra.get("_bf16_attend") else _ONE_QUERY
    from llmtune.train import precision

    precision._fuse_projections = _FUSE if extra.get("_fuse", True) else (lambda *args: None)
    cfg.update({k: v for k, v in extra.items() if not k.startswith("_")})
    n0 = len(t.steps)
    with tempfile.TemporaryDirectory() as out:
        cfg["output_dir"] = out
        run_train(cfg)
    return t.steps[n0:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variants", default='{"llmtune": {}}')
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grpo_profile.json"))
    a = ap.parse_args(argv)
    variants = json.loads(a.variants)
    global _ONE_QUERY, _FUSE
    from llmtune.models import transformer
    from llmtune.train import precision

    _ONE_QUERY, _FUSE = transformer._attend_one_query, precision._fuse_projections
    t = Timers()
    install(t)
    load0 = os.getloadavg()
    runs: dict[str, list] = {v: [] for v in variants}
    for _ in range(a.repeats):
        for name, extra in variants.items():
            w0 = time.perf_counter()
            steps = run_job(a, extra, t)
            runs[name].append({"wall_s": time.perf_counter() - w0, "steps": steps})
    cols = ("step",) + PHASES + ("other",)
    print(f"\nGRPO step profile: {a.steps} steps x 8 completions x <= {a.new_tokens} new tokens; seconds per step "
          f"(mean over steps and repeats); load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"{'variant':10} " + " ".join(f"{c:>9}" for c in cols) + f" {'run s':>7}")
    summary = {}
    for name, rs in runs.items():
        steps = [s for r in rs for s in r["steps"]]
        mean = {c: sum(s.get(c, 0.0) for s in steps) / max(1, len(steps)) for c in cols}
        summary[name] = {"mean_s": mean, "run_wall_s": [round(r["wall_s"], 2) for r in rs]}
        print(f"{name:10} " + " ".join(f"{mean[c]:9.3f}" for c in cols) +
              f" {sum(r['wall_s'] for r in rs) / len(rs):7.1f}")
        print(f"{'  share':10} " + " ".join(f"{100 * mean[c] / mean['step']:8.1f}%" for c in cols))
    result = {"benchmark": "grpo_profile", "args": vars(a), "load_avg_start": load0, "load_avg_end": os.getloadavg(),
              "summary": summary, "runs": runs, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
