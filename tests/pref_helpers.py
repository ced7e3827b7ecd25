"""Shared helpers of the rm/dpo/kto stage tests: tiny models, random rows, and the independent references
(full-logits log-probs, written here without llmtune.losses)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from tiny_helpers import VOCAB, tiny_model  # noqa: F401  (re-exported to the stage tests)
from config_helpers import make_config


def lora_pair(seed: int = 0, rank: int = 4):
    """(base copy, LoRA model) with non-zero B so the adapters change the outputs."""
    from llmtune.peft import apply_lora

    model = tiny_model(seed)
    base = copy.deepcopy(model).eval()
    apply_lora(model, lora_rank=rank, lora_alpha=2 * rank, lora_target="all")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return base, model


def seq(n, g):
    return torch.randint(1, VOCAB, (n,), generator=g).tolist()


def pair_rows(n_pairs: int, seed: int = 0):
    """Rows as the data layer gives them for rm/dpo: same prompt, different responses and lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_pairs):
        p = seq(3 + i % 3, g)
        c, r = seq(4 + (i * 2) % 5, g), seq(3 + (i * 3) % 4, g)
        rows.append({"chosen_input_ids": p + c, "chosen_attention_mask": [1] * (len(p) + len(c)),
                     "chosen_labels": [-100] * len(p) + c,
                     "rejected_input_ids": p + r, "rejected_attention_mask": [1] * (len(p) + len(r)),
                     "rejected_labels": [-100] * len(p) + r})
    return rows


def sft_rows(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p, a = seq(2 + i % 3, g), seq(3 + i % 4, g)
        rows.append({"input_ids": p + a, "attention_mask": [1] * (len(p) + len(a)), "labels": [-100] * len(p) + a,
                     "sft_only": True})
    return rows


def kto_rows(n: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    prompts = [seq(2 + i % 3, g) for i in range(n)]
    answers = [seq(3 + (i * 2) % 5, g) for i in range(n)]
    rows = []
    for i in range(n):
        p, a, a2 = prompts[i], answers[i], answers[(i + 1) % n]
        rows.append({"input_ids": p + a, "attention_mask": [1] * (len(p) + len(a)), "labels": [-100] * len(p) + a,
                     "kl_input_ids": p + a2, "kl_attention_mask": [1] * (len(p) + len(a2)),
                     "kl_labels": [-100] * len(p) + a2, "kto_tag": i % 3 != 1})
    return rows


def ref_seq_logps(model, ids_list, labels_list, average=False):
    """Independent log-probs: each sequence ALONE (no padding), full float64 logits, log_softmax, gather."""
    out = []
    for ids, labels in zip(ids_list, labels_list):
        ids_t = torch.tensor([ids])
        with torch.no_grad():
            logits = model.lm_head(model(ids_t, attention_mask=torch.ones_like(ids_t))).double()[0]
        lp = torch.log_softmax(logits[:-1], -1)
        tgt = torch.tensor(labels[1:])
        m = tgt != -100
        vals = lp[torch.arange(len(tgt))[m], tgt[m]]
        out.append(vals.mean() if average else vals.sum())
    return torch.stack(out)


def ctx(**kw):
    from llmtune.train.stages import StageContext

    base = dict(stage="dpo", pref_beta=0.1, pref_loss="sigmoid", pref_ftx=0.0, dpo_label_smoothing=0.0,
                simpo_gamma=0.5, kto_alpha=None, kto_chosen_weight=1.0, kto_rejected_weight=1.0)
    extra = kw.pop("extra", {})
    base.update(kw)
    return StageContext(config=make_config(**base), extra=extra)


def logsig(x):
    return F.logsigmoid(torch.as_tensor(x, dtype=torch.float64))


def run_llmtune(args, tmp_path, timeout=900):
    """``python -m llmtune <args>`` in ``tmp_path`` with its own dataset cache; asserts exit 0."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, LLMTUNE_CACHE=str(tmp_path / ".cache"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "llmtune"] + [str(a) for a in args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"llmtune {' '.join(map(str, args))}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def train_log(folder):
    """The step entries (with a loss) of ``trainer_log.jsonl``, and the eval entries."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(folder) / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if any(k.startswith("eval_") for k in r)]
