"""GRPO losses against independent references: the papers' equations written out per token in float64 below
(DeepSeekMath eqs. 3-4, Dr. GRPO, DAPO eq. 8, GSPO eq. 7), hand-computed advantages, and TRL's
GRPOTrainer._compute_loss (test-only reference, called on the same tensors through a small shim)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llmtune.errors import LLMTuneError
from llmtune.losses import group_advantages, grpo_loss, grpo_num_items

N, C = 6, 5


def batch(seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 4, 1, 3, 5]
    mask = torch.tensor([[1] * n + [0] * (C - n) for n in lengths], dtype=torch.long)
    logps = -torch.rand(N, C, generator=g, dtype=torch.float64) * 2
    old = logps + spread * torch.randn(N, C, generator=g, dtype=torch.float64)
    ref = logps + spread * torch.randn(N, C, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.3], dtype=torch.float64)
    return logps, old, ref, adv, mask


def paper_loss(logps, old, ref, adv, mask, loss_type, eps_low=0.2, eps_high=None, beta=0.0, level="token",
               l_max=None):
    """The objective written per token from the papers (float64 scalars), as a loss (negated objective)."""
    eps_high = eps_low if eps_high is None else eps_high
    per_seq, total, n_tok = [], logps.new_zeros(()), 0
    for i in range(logps.shape[0]):
        toks = [t for t in range(logps.shape[1]) if mask[i, t]]
        if importance_seq := (level == "sequence"):  # GSPO eq. 7: exp(mean log-ratio)
            s = torch.exp(sum(logps[i, t] - old[i, t] for t in toks) / len(toks))
        seq = logps.new_zeros(())
        for t in toks:
            w = s if importance_seq else torch.exp(logps[i, t] - old[i, t])
            l = -torch.min(w * adv[i], torch.clamp(w, 1 - eps_low, 1 + eps_high) * adv[i])
            if beta:
                d = ref[i, t] - logps[i, t]
                l = l + beta * (torch.exp(d) - d - 1)  # DeepSeekMath eq. 4
            seq = seq + l
        per_seq.append(seq / len(toks))
        total = total + seq
        n_tok += len(toks)
    if loss_type == "grpo":  # eq. 3: 1/G sum_i 1/|o_i| sum_t
        return sum(per_seq) / len(per_seq)
    if loss_type in ("bnpo", "dapo"):  # DAPO eq. 8: 1/sum|o_i| sum_i sum_t
        return total / n_tok
    if loss_type == "dr_grpo":  # Dr. GRPO: constant normaliser
        return total / (logps.shape[0] * l_max)
    raise ValueError(loss_type)


CASES = [dict(loss_type=lt) for lt in ("grpo", "bnpo", "dr_grpo", "dapo")] + [
    dict(loss_type="dapo", beta=0.04),
    dict(loss_type="grpo", beta=0.1, eps_high=0.28),
    dict(loss_type="bnpo", eps_high=0.28),
    dict(loss_type="grpo", level="sequence"),
    dict(loss_type="dapo", level="sequence", beta=0.05, eps_high=0.3),
    dict(loss_type="dr_grpo", beta=0.02, level="sequence"),
]


def call(logps, old, ref, adv, mask, loss_type, eps_low=0.2, eps_high=None, beta=0.0, level="token", **kw):
    return grpo_loss(logps, old, ref, adv, mask, loss_type=loss_type, epsilon=eps_low, epsilon_high=eps_high,
                     beta=beta, importance_sampling_level=level, max_completion_length=8, **kw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_gradient_match_paper_equations(case):
    logps, old, ref, adv, mask = batch()
    a = logps.clone().requires_grad_()
    loss_sum, items, metrics = call(a.float(), old.float(), ref.float(), adv.float(), mask, **case)
    (loss_sum / items).backward()
    b = logps.clone().requires_grad_()
    ref_loss = paper_loss(b, old, ref, adv, mask, l_max=8, **case)
    ref_loss.backward()
    assert items == grpo_num_items(mask, case["loss_type"])
    torch.testing.assert_close((loss_sum / items).double(), ref_loss.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    assert ("kl" in metrics) == bool(case.get("beta"))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_accumulation_over_micro_batches_equals_the_whole_step(loss_type):
    """sum(loss_sum) / sum(num_items) over two micro-batches is the variant's loss of the whole step."""
    logps, old, ref, adv, mask = batch(1)
    whole = paper_loss(logps, old, ref, adv, mask, loss_type, beta=0.1, l_max=8)
    parts = [call(logps[s].float(), old[s].float(), ref[s].float(), adv[s].float(), mask[s], loss_type, beta=0.1)
             for s in (slice(0, 3), slice(3, 6))]
    acc = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    torch.testing.assert_close(acc.double(), whole, atol=1e-6, rtol=1e-5)


def test_bnpo_accumulates_as_the_mean_of_micro_batch_means():
    logps, old, ref, adv, mask = batch(2)
    halves = (slice(0, 3), slice(3, 6))
    want = sum(paper_loss(logps[s], old[s], ref[s], adv[s], mask[s], "bnpo") for s in halves) / 2
    parts = [call(logps[s].float(), old[s].float(), None, adv[s].float(), mask[s], "bnpo") for s in halves]
    torch.testing.assert_close((sum(p[0] for p in parts) / sum(p[1] for p in parts)).double(), want,
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("junk_value", [37.0, float("inf"), float("nan")])
def test_masked_positions_have_no_effect(junk_value):
    logps, old, ref, adv, mask = batch(3)
    junk = torch.where(mask.bool(), torch.zeros_like(logps), torch.full_like(logps, junk_value))
    ent = torch.rand(N, C, dtype=torch.float64)
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for level in ("token", "sequence"):
            a_in = logps.float().requires_grad_()
            a = call(a_in, old.float(), ref.float(), adv.float(), mask, lt, beta=0.1, level=level,
                     entropies=ent.float())
            b_in = (logps + junk).float().requires_grad_()
            b = call(b_in, (old - junk).float(), (ref + 2 * junk).float(), adv.float(), mask, lt, beta=0.1,
                     level=level, entropies=(ent + junk).float())
            assert a[1] == b[1]
            torch.testing.assert_close(a[0], b[0])
            for k in a[2]:
                torch.testing.assert_close(a[2][k], b[2][k])
            a[0].backward()
            b[0].backward()
            torch.testing.assert_close(a_in.grad, b_in.grad)
            assert (b_in.grad[~mask.bool()] == 0).all()


def test_on_policy_ratio_is_one_and_gradient_is_the_policy_gradient():
    """old_logps=None: w = 1 with gradient dw/dlogp = 1, so dL/dlogp_it = -A_i m_it / |o_i| for grpo."""
    logps, _, _, adv, mask = batch(4)
    a = logps.float().clone().requires_grad_()
    loss_sum, items, metrics = grpo_loss(a, None, None, adv.float(), mask, loss_type="grpo")
    (loss_sum / items).backward()
    lengths = mask.sum(1, keepdim=True).double()
    want = -adv[:, None] * mask / lengths / N
    torch.testing.assert_close(a.grad.double(), want, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(loss_sum / items, -adv.float().mean())
    assert float(metrics["clip_ratio/region_mean"]) == 0.0


def test_clip_metrics_hand_case():
    # one completion of 2 tokens per row; ratios e^0.5 = 1.65 (above 1 + 0.28) and e^-0.5 = 0.61 (below 0.8)
    logps = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    old = torch.tensor([[-0.5, 0.0], [0.5, 0.0], [-0.2, 0.0]])
    adv = torch.tensor([1.0, -1.0, 1.0])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
    _, _, m = grpo_loss(logps, old, None, adv, mask, epsilon=0.2, epsilon_high=0.28,
                        entropies=torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 99.0]]))
    # tokens: high-clipped (row 0 t0), low-clipped (row 1 t0), ratio 1.22 < 1.28 not clipped (row 2)
    assert float(m["clip_ratio/high_mean"]) == pytest.approx(1 / 5)
    assert float(m["clip_ratio/low_mean"]) == pytest.approx(1 / 5)
    assert float(m["clip_ratio/region_mean"]) == pytest.approx(2 / 5)
    assert float(m["entropy"]) == pytest.approx(15 / 5)
    # with epsilon_high = epsilon row 2 is clipped too
    _, _, m = grpo_loss(logps, old, None, adv, mask, epsilon=0.2)
    assert float(m["clip_ratio/high_mean"]) == pytest.approx(2 / 5)
    # sequence level: one decision per completion (row means: 0.25, -0.25, 0.2 -> ratios 1.28.., 0.78, 1.22)
    _, _, m = grpo_loss(logps, old, None, adv, mask, epsilon=0.2, epsilon_high=0.25,
                        importance_sampling_level="sequence")
    assert float(m["clip_ratio/high_mean"]) == pytest.approx(1 / 3)
    assert float(m["clip_ratio/low_mean"]) == pytest.approx(1 / 3)


def test_beta_zero_vs_positive():
    logps, old, ref, adv, mask = batch(5)
    l0 = call(logps.float(), old.float(), None, adv.float(), mask, "dapo")
    l1 = call(logps.float(), old.float(), ref.float(), adv.float(), mask, "dapo", beta=0.5)
    d = (ref - logps)
    kl = ((torch.exp(d) - d - 1) * mask).sum() / mask.sum()
    torch.testing.assert_close(l1[2]["kl"].double(), kl, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(((l1[0] - l0[0]) / l1[1]).double(), 0.5 * kl, atol=1e-6, rtol=1e-5)
    assert "kl" not in l0[2]
    with pytest.raises(LLMTuneError, match="ref_logps"):
        call(logps.float(), old.float(), None, adv.float(), mask, "dapo", beta=0.1)


def test_bad_options_raise():
    logps, old, ref, adv, mask = batch()
    with pytest.raises(LLMTuneError, match="Did you mean: dr_grpo"):
        grpo_loss(logps, old, None, adv, mask, loss_type="dr-grpo")
    with pytest.raises(LLMTuneError, match="max_completion_length"):
        grpo_loss(logps, old, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(LLMTuneError, match="importance_sampling_level"):
        grpo_loss(logps, old, None, adv, mask, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logps, old, None, adv[:3], mask)


# ---------------------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------------------
def test_group_advantages_hand_computed():
    r = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 2.0, 0.0, 1.0]
    t = torch.tensor(r)
    groups = [r[0:3], r[3:6], r[6:9]]
    # group: (r - mean) / (sample std + 1e-4), DeepSeekMath sec. 4.1.2
    want = [(x - statistics.mean(g)) / (statistics.stdev(g) + 1e-4) for g in groups for x in g]
    torch.testing.assert_close(group_advantages(t, 3, "group"), torch.tensor(want))
    # none: Dr. GRPO, r - mean
    want = [x - statistics.mean(g) for g in groups for x in g]
    torch.testing.assert_close(group_advantages(t, 3, "none"), torch.tensor(want))
    # batch: group mean, batch std
    sd = statistics.stdev(r)
    want = [(x - statistics.mean(g)) / (sd + 1e-4) for g in groups for x in g]
    torch.testing.assert_close(group_advantages(t, 3, "batch"), torch.tensor(want))
    # a group with equal rewards has advantage 0
    assert group_advantages(torch.tensor([0.3, 0.3]), 2).tolist() == [0.0, 0.0]


def test_group_advantages_ignore_unscored_completions():
    nan = float("nan")
    r = torch.tensor([1.0, nan, 0.0, 0.0, nan, nan])
    adv = group_advantages(r, 3, "group")
    s = statistics.stdev([1.0, 0.0])
    torch.testing.assert_close(adv, torch.tensor([0.5 / (s + 1e-4), 0.0, -0.5 / (s + 1e-4), 0.0, 0.0, 0.0]))
    with pytest.raises(LLMTuneError, match="multiple of num_generations"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(LLMTuneError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "groups")


# ---------------------------------------------------------------------------------------------------------------
# TRL's GRPOTrainer._compute_loss as a test-only reference
# ---------------------------------------------------------------------------------------------------------------
def trl_loss(logps, old, ref, adv, mask, entropies, *, loss_type, epsilon, epsilon_high, beta, level, l_max):
    """Call TRL's ``_compute_loss`` unbound on a shim whose log-prob function returns our fixed tensors."""
    try:
        from trl.trainer.grpo_trainer import GRPOTrainer
    except Exception as exc:  # pragma: no cover - depends on the installed TRL
        pytest.skip(f"trl's GRPOTrainer is not importable: {exc}")

    class Acc:
        num_processes = 1

        @staticmethod
        def reduce(x, reduction="sum"):
            return x

        @staticmethod
        def gather(x):
            return x

        gather_for_metrics = gather

    shim = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon_high, use_vllm=False, vllm_importance_sampling_correction=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=l_max,
        accelerator=Acc(), _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        get_off_policy_mask=None)
    n, c = mask.shape
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros(n, c, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum().float()}
    loss = GRPOTrainer._compute_loss(shim, None, inputs)
    return loss, {k: v[-1] for k, v in shim._metrics["train"].items()}


TRL_CASES = [dict(loss_type=lt, beta=b, epsilon_high=eh, level=lv)
             for lt in ("grpo", "bnpo", "dr_grpo", "dapo") for b, eh, lv in
             ((0.0, 0.2, "token"), (0.04, 0.28, "token"), (0.0, 0.28, "sequence"), (0.1, 0.2, "sequence"))]


@pytest.mark.parametrize("case", TRL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_trl_compute_loss(case):
    pytest.importorskip("trl")
    logps, old, ref, adv, mask = batch(6, spread=0.4)
    logps, old, ref, adv = logps.float(), old.float(), ref.float(), adv.float()
    ent = torch.rand(N, C, generator=torch.Generator().manual_seed(9))
    a = logps.clone().requires_grad_()
    loss_sum, items, ours = grpo_loss(a, old, ref, adv, mask, loss_type=case["loss_type"], epsilon=0.2,
                                      epsilon_high=case["epsilon_high"], beta=case["beta"],
                                      importance_sampling_level=case["level"], max_completion_length=8, entropies=ent)
    (loss_sum / items).backward()
    b = logps.clone().requires_grad_()
    theirs_loss, theirs = trl_loss(b, old, ref, adv, mask, ent, loss_type=case["loss_type"], epsilon=0.2,
                                   epsilon_high=case["epsilon_high"], beta=case["beta"], level=case["level"], l_max=8)
    theirs_loss.backward()
    torch.testing.assert_close(loss_sum / items, theirs_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "kl"):
        if k in theirs:
            assert math.isclose(float(ours[k]), theirs[k], rel_tol=1e-5, abs_tol=1e-6), k
    assert ("kl" in ours) == ("kl" in theirs)
