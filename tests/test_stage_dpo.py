"""Stage dpo on tiny models: every pref_loss against its paper formula written here, on log-probs computed
independently (each sequence alone, full float64 logits); the reference = the base model (adapters disabled);
one stacked forward == separate forwards; the seed's kto_alpha mix; item counting under accumulation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llmtune.data.collator import get_collator
from llmtune.errors import LLMTuneError
from llmtune.train.stages import get_stage, item_counter
from pref_helpers import ctx, logsig, lora_pair, pair_rows, ref_seq_logps, sft_rows, tiny_model
from config_helpers import make_config

B = 4


@pytest.fixture(scope="module")
def setup():
    base, model = lora_pair(0)
    rows = pair_rows(B)
    batch = get_collator("dpo", 0)(rows)
    ch_ids = [r["chosen_input_ids"] for r in rows]
    ch_lab = [r["chosen_labels"] for r in rows]
    rj_ids = [r["rejected_input_ids"] for r in rows]
    rj_lab = [r["rejected_labels"] for r in rows]
    logps = {}
    for avg in (False, True):
        logps[avg] = dict(pc=ref_seq_logps(model, ch_ids, ch_lab, avg), pr=ref_seq_logps(model, rj_ids, rj_lab, avg),
                          rc=ref_seq_logps(base, ch_ids, ch_lab, avg), rr=ref_seq_logps(base, rj_ids, rj_lab, avg))
    return model, batch, logps


def run(model, batch, **kw):
    c = ctx(**kw)
    loss_sum, n, metrics = get_stage("dpo")(model, batch, c)
    return loss_sum.double(), int(n), metrics


def test_lora_reference_is_the_base_model(setup):
    from llmtune.peft import disable_adapters
    from llmtune.train.stages.pref import reference_logps

    model, batch, lp = setup
    ref = reference_logps(model, ctx(), batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                          batch["labels"]).double()
    torch.testing.assert_close(ref, torch.cat([lp[False]["rc"], lp[False]["rr"]]), atol=1e-5, rtol=1e-5)
    assert not any(m.adapters_disabled for m in model.modules() if hasattr(m, "adapters_disabled"))
    with disable_adapters(model):  # and the adapters really change the policy
        pass
    assert (lp[False]["pc"] - lp[False]["rc"]).abs().max() > 1e-2


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_sigmoid_matches_eq7_with_conservative_smoothing(setup, smoothing):
    model, batch, lp = setup
    beta = 0.3
    d = lp[False]
    h = (d["pc"] - d["rc"]) - (d["pr"] - d["rr"])
    want = (-(1 - smoothing) * logsig(beta * h) - smoothing * logsig(-beta * h)).sum()
    loss_sum, n, m = run(model, batch, pref_beta=beta, dpo_label_smoothing=smoothing)
    assert n == B
    torch.testing.assert_close(loss_sum, want, atol=1e-5, rtol=1e-5)
    cr, rr = beta * (d["pc"] - d["rc"]), beta * (d["pr"] - d["rr"])
    assert math.isclose(float(m["rewards/chosen"]), float(cr.mean()), abs_tol=1e-5)
    assert math.isclose(float(m["rewards/rejected"]), float(rr.mean()), abs_tol=1e-5)
    assert math.isclose(float(m["rewards/margins"]), float((cr - rr).mean()), abs_tol=1e-5)
    assert math.isclose(float(m["rewards/accuracies"]), float((cr > rr).double().mean()), abs_tol=1e-6)
    assert math.isclose(float(m["logps/chosen"]), float(d["pc"].mean()), abs_tol=1e-4)
    assert math.isclose(float(m["logps/rejected"]), float(d["pr"].mean()), abs_tol=1e-4)


def test_hinge_ipo_kto_pair(setup):
    model, batch, lp = setup
    beta = 0.5
    d = lp[False]
    h = (d["pc"] - d["rc"]) - (d["pr"] - d["rr"])
    torch.testing.assert_close(run(model, batch, pref_loss="hinge", pref_beta=beta)[0],
                               torch.relu(1 - beta * h).sum(), atol=1e-5, rtol=1e-5)
    a = lp[True]  # IPO: length-averaged log-probs (Azar et al. eq. 17)
    ha = (a["pc"] - a["rc"]) - (a["pr"] - a["rr"])
    torch.testing.assert_close(run(model, batch, pref_loss="ipo", pref_beta=beta)[0],
                               ((ha - 1 / (2 * beta)) ** 2).sum(), atol=1e-5, rtol=1e-5)
    rw, rl = d["pc"] - d["rc"], d["pr"] - d["rr"]  # TRL's paired KTO, batch KL estimates clamped at 0
    zw, zl = rw.mean().clamp(min=0), rl.mean().clamp(min=0)
    want = torch.cat([1 - torch.sigmoid(beta * (rw - zl)), 1 - torch.sigmoid(beta * (zw - rl))]).mean() * B
    torch.testing.assert_close(run(model, batch, pref_loss="kto_pair", pref_beta=beta)[0], want, atol=1e-5, rtol=1e-5)


def test_orpo_and_simpo_are_reference_free(setup, monkeypatch):
    from llmtune.train.stages import pref as stages_pref

    model, batch, lp = setup
    monkeypatch.setattr(stages_pref, "reference_logps", lambda *a, **k: pytest.fail("reference forward"))
    a = lp[True]
    lam = 0.25  # ORPO (Hong et al. 2024, eqs. 4-7): NLL(chosen) + lambda * L_OR
    odds = lambda x: x - torch.log1p(-torch.exp(x))  # noqa: E731
    want = (-a["pc"] - lam * logsig(odds(a["pc"]) - odds(a["pr"]))).sum()
    torch.testing.assert_close(run(model, batch, pref_loss="orpo", pref_beta=lam)[0], want, atol=1e-5, rtol=1e-5)
    beta, gamma = 2.0, 0.7  # SimPO (Meng et al. 2024, eq. 6)
    want = (-logsig(beta * a["pc"] - beta * a["pr"] - gamma)).sum()
    loss, _, m = run(model, batch, pref_loss="simpo", pref_beta=beta, simpo_gamma=gamma)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert math.isclose(float(m["rewards/chosen"]), float(beta * a["pc"].mean()), abs_tol=1e-5)


def test_pref_ftx_adds_the_per_token_chosen_nll(setup):
    model, batch, lp = setup
    d, a = lp[False], lp[True]
    h = (d["pc"] - d["rc"]) - (d["pr"] - d["rr"])
    want = (-logsig(0.1 * h) + 0.5 * (-a["pc"])).sum()
    torch.testing.assert_close(run(model, batch, pref_ftx=0.5)[0], want, atol=1e-5, rtol=1e-5)


def test_one_stacked_forward_equals_separate_forwards(setup):
    """The (2B, T) stacked batch (padding to the longer side) gives the loss of chosen and rejected run apart."""
    from llmtune.data.collator import SFTCollator
    from llmtune.losses import sequence_logps
    from llmtune.train.stages.pref import reference_logps

    model, batch, _ = setup
    rows = pair_rows(B)
    sep = {}
    for side in ("chosen", "rejected"):
        b = SFTCollator(0)([{k[len(side) + 1:]: v for k, v in r.items() if k.startswith(side)} for r in rows])
        with torch.no_grad():
            h = model(b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])
            sep[side] = (sequence_logps(h, model.lm_head.weight, b["labels"]).double(),
                         reference_logps(model, ctx(), b["input_ids"], b["attention_mask"], b["position_ids"],
                                         b["labels"]).double())
    h = (sep["chosen"][0] - sep["chosen"][1]) - (sep["rejected"][0] - sep["rejected"][1])
    assert batch["input_ids"].shape[0] == 2 * B
    calls = []
    hook = model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    try:
        loss = run(model, batch)[0]
    finally:
        hook.remove()
    assert calls == [batch["input_ids"].shape] * 2  # one policy + one reference forward, both (2B, T)
    torch.testing.assert_close(loss, (-logsig(0.1 * h)).sum(), atol=1e-5, rtol=1e-5)


def test_kto_alpha_mix_adds_alpha_times_mean_nll_and_counts_sft_rows(setup):
    model, _, lp = setup
    rows = pair_rows(B) + sft_rows(3)
    batch = get_collator("dpo", 0)(rows)
    get_stage("dpo")
    assert item_counter("dpo")(batch) == B + 3
    s = sft_rows(3)
    nll = -ref_seq_logps(model, [r["input_ids"] for r in s], [r["labels"] for r in s], average=True)
    d = lp[False]
    h = (d["pc"] - d["rc"]) - (d["pr"] - d["rr"])
    loss, n, m = run(model, batch, kto_alpha=0.5)
    assert n == B + 3
    torch.testing.assert_close(loss, (-logsig(0.1 * h)).sum() + 0.5 * nll.sum(), atol=1e-5, rtol=1e-5)
    assert math.isclose(float(m["sft_loss"]), float(nll.mean()), rel_tol=1e-5)
    only = get_collator("dpo", 0)(s)  # a micro-batch of SFT rows only
    loss, n, m = run(model, only, kto_alpha=0.5)
    assert n == 3 and "rewards/chosen" not in m
    torch.testing.assert_close(loss, 0.5 * nll.sum(), atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_gives_the_big_batch_gradient(tmp_path):
    """dpo + kto_alpha: 2 micro-batches (mixed pairs / sft rows) == 1 batch, via the trainer's item division."""
    from llmtune.train.trainer import Trainer

    rows = pair_rows(4) + sft_rows(2)
    grads = []
    for bs, ga in ((6, 1), (3, 2)):
        _, model = lora_pair(0)
        cfg = make_config(stage="dpo", output_dir=str(tmp_path / f"o{bs}"), per_device_train_batch_size=bs,
                                    gradient_accumulation_steps=ga, max_steps=1, learning_rate=0.0, kto_alpha=0.5,
                                    pref_beta=0.2, report_to="none", seed=3)
        t = Trainer(model, cfg, rows, collator=get_collator("dpo", 0))
        order = list(range(6))
        micro = [t.collate(order[i * bs:(i + 1) * bs]) for i in range(ga)]
        t.accumulate_gradients(micro)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-4)


def test_full_finetuning_reference_is_a_frozen_copy_of_the_initial_model(capsys):
    from llmtune.train.stages.pref import reference_extra

    model = tiny_model(1)
    init = copy.deepcopy(model)
    cfg = make_config(stage="dpo", pref_loss="sigmoid", finetuning_type="full", ref_model=None)
    extra = reference_extra(model, cfg)
    err = capsys.readouterr().err
    assert "frozen copy" in err and "MiB" in err
    ref = extra["ref_model"]
    assert not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    rows = pair_rows(2)
    batch = get_collator("dpo", 0)(rows)
    loss, _, _ = run(model, batch, extra=extra)
    d = {k: ref_seq_logps(m, [r[f"{s}_input_ids"] for r in rows], [r[f"{s}_labels"] for r in rows])
         for k, m, s in (("pc", model, "chosen"), ("pr", model, "rejected"), ("rc", init, "chosen"),
                         ("rr", init, "rejected"))}
    h = (d["pc"] - d["rc"]) - (d["pr"] - d["rr"])
    torch.testing.assert_close(loss, (-logsig(0.1 * h)).sum(), atol=1e-5, rtol=1e-5)


def test_orpo_needs_no_reference_and_lora_needs_no_copy():
    from llmtune.train.stages.pref import reference_extra

    _, model = lora_pair(0)
    assert reference_extra(model, make_config(stage="dpo", pref_loss="sigmoid", ref_model=None)) == {}
    full = tiny_model(0)
    assert reference_extra(full, make_config(stage="dpo", pref_loss="orpo", ref_model=None)) == {}


def test_unknown_pref_loss_is_one_clear_error(setup):
    from llmtune.train.stages.pref import reference_extra

    model, batch, _ = setup
    with pytest.raises(LLMTuneError, match=r"pref_loss: 'sigmoidd'.*sigmoid, hinge, ipo, kto_pair, orpo, simpo"):
        run(model, batch, pref_loss="sigmoidd")
    with pytest.raises(LLMTuneError, match="pref_loss"):
        reference_extra(model, make_config(stage="dpo", pref_loss="dpo", ref_model=None))


@pytest.mark.real
def test_real_dpo_lora_sigmoid_learns_the_demo_pairs(real_model_path, shared_data_dir, tmp_path):
    """llmtune train --stage dpo on the real GGUF and dpo_en_demo: late steps prefer chosen (acc > 0.5, margin > 0)."""
    from pref_helpers import run_llmtune, train_log

    out = tmp_path / "dpo"
    run_llmtune(["train", "--stage", "dpo", "--model_name_or_path", real_model_path, "--dataset", "dpo_en_demo",
                 "--dataset_dir", shared_data_dir, "--template", "chatml", "--finetuning_type", "lora",
                 "--lora_target", "all", "--lora_rank", "8", "--lora_alpha", "16", "--cutoff_len", "64",
                 "--max_samples", "12", "--per_device_train_batch_size", "2", "--learning_rate", "5e-4",
                 "--lr_scheduler_type", "constant", "--max_steps", "12", "--logging_steps", "1", "--bf16", "true",
                 "--pref_beta", "0.1", "--pref_loss", "sigmoid", "--seed", "0", "--save_steps", "1000",
                 "--output_dir", out], tmp_path)
    steps, _ = train_log(out)
    last = steps[-4:]
    acc = sum(e["rewards/accuracies"] for e in last) / len(last)
    margin = sum(e["rewards/margins"] for e in last) / len(last)
    print(f"dpo last-4-step rewards/accuracies {acc:.3f}, rewards/margins {margin:.4f}")
    assert acc > 0.5 and margin > 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "llmtune.json").is_file()
