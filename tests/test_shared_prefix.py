"""Shared-prompt packing (llmtune.models.shared_prefix) in GRPO's completion forward: log-probs, entropy and
gradients against transformers (test-only reference) running every ``prompt + completion`` row alone, float32;
the layout's token count by hand; the fall-back when no rows share a prompt."""

from __future__ import annotations

import pytest
import torch

from llmtune.models.shared_prefix import shared_prompt_layout
from llmtune.train.stages.grpo import completion_forward

transformers = pytest.importorskip("transformers")

from test_generation import tiny_pair  # noqa: E402

# two groups (3 rows, 2 rows) with left-padded prompts of different lengths; completions of 1..5 tokens
PROMPT_A, PROMPT_B = [5, 17, 33, 2, 8], [9, 3, 71]
COMPLETIONS = [[40, 41, 42, 43], [50], [60, 61, 62, 63, 64], [70, 71], [80, 81, 82]]
PROMPTS = [PROMPT_A] * 3 + [PROMPT_B] * 2


def rollout_rows(prompts=PROMPTS, completions=COMPLETIONS, pad=0):
    """The rollout layout by hand: ``(N, P + C)`` ids/mask, ``P``, and a completion mask with row 2's last token
    and row 4's whole completion left out of the loss (as ``mask_truncated_completions`` would)."""
    p, c = max(map(len, prompts)), max(map(len, completions))
    n = len(prompts)
    ids = torch.full((n, p + c), pad, dtype=torch.long)
    attn = torch.zeros(n, p + c, dtype=torch.long)
    for i, (pr, co) in enumerate(zip(prompts, completions)):
        ids[i, p - len(pr):p], attn[i, p - len(pr):p] = torch.tensor(pr), 1
        ids[i, p:p + len(co)], attn[i, p:p + len(co)] = torch.tensor(co), 1
    mask = attn[:, p:].clone()
    if n == 5:
        mask[2, 4] = 0
        mask[4] = 0
    return ids, attn, p, mask


def hf_row_logps(hf, prompt, completion, temperature):
    """transformers on ``prompt + completion`` alone: (log-probs, entropies) of the completion's tokens."""
    ids = torch.tensor([prompt + completion])
    logits = hf(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    logp = torch.log_softmax(logits, -1)
    ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0], ent


def test_layout_by_hand():
    """5 rows in 2 groups: one prompt copy per group, positions continuing the prompt, the first completion token
    predicted from the prompt's last position."""
    ids, attn, p, mask = rollout_rows()
    lay = shared_prompt_layout(ids, attn, p, mask)
    assert lay.tokens_unshared == 3 * 5 + 2 * 3 + sum(map(len, COMPLETIONS))
    assert lay.input_ids.shape[1] == 5 + 3 + sum(map(len, COMPLETIONS))
    assert lay.input_ids[0, :9].tolist() == PROMPT_A + [40, 41, 42, 43]
    assert lay.position_ids[0, :14].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 5, 5, 6, 7, 8]
    assert lay.spans.parents == [-1, 0, 0, 0, -1, 4, 4]
    assert lay.src[:3].tolist() == [4, 5, 6]          # prompt A's last token, then the completion's own tokens
    assert lay.src[4].item() == 4                      # row 1's only token: predicted from prompt A's last token
    assert len(lay.targets) == int(mask.sum()) and lay.targets[:4].tolist() == [40, 41, 42, 43]
    ids3, attn3, p3, mask3 = rollout_rows([[1, 2], [1, 2]], [[], [7, 8]])     # an empty completion: no span
    lay3 = shared_prompt_layout(ids3, attn3, p3, mask3)
    assert lay3.input_ids[0].tolist() == [1, 2, 7, 8] and lay3.spans.parents == [-1, 0]
    assert lay3.rows.tolist() == [1, 1] and lay3.src.tolist() == [1, 2]
    distinct = [[1, 2], [3, 4]]
    ids2, attn2, p2, mask2 = rollout_rows(distinct, [[5], [6]])
    assert shared_prompt_layout(ids2, attn2, p2, mask2) is None


@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen2", True), ("qwen3", True)])
def test_logps_entropy_and_gradients_equal_transformers_rows_alone(family, tie):
    """float32: shared-prompt log-probs and entropies equal transformers' single-row values (1e-5), and the
    gradient of ``sum(w * logps)`` wrt every weight equals transformers' (1e-5 relative to its scale)."""
    hf, ours = tiny_pair(family, tie)
    ids, attn, p, mask = rollout_rows()
    t = 0.7
    weights = torch.linspace(-1.0, 1.5, mask.numel()).view(mask.shape) * mask
    out = completion_forward(ours, ids, attn, p, mask, t, entropy=True)
    shared = shared_prompt_layout(ids, attn, p, mask)
    assert shared.input_ids.shape[1] < shared.tokens_unshared
    (out["logps"] * weights).sum().backward()
    total = 0.0
    for i, (pr, co) in enumerate(zip(PROMPTS, COMPLETIONS)):
        lp, ent = hf_row_logps(hf, pr, co, t)
        m = mask[i, :len(co)].bool()
        torch.testing.assert_close(out["logps"][i, :len(co)][m], lp[m].detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(out["entropy"][i, :len(co)][m], ent[m].detach(), rtol=0, atol=1e-5)
        assert (out["logps"][i][~mask[i].bool()] == 0).all()
        total = total + (lp * weights[i, :len(co)]).sum()
    total.backward()
    theirs = dict(hf.named_parameters())
    for name, prm in ours.named_parameters():
        ref = theirs[name].grad
        if ref is None:
            continue
        scale = ref.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(prm.grad / scale, ref / scale, rtol=0, atol=1e-5, msg=name)


def test_off_when_disabled_or_sliding_window_gives_the_same_values():
    """``share_prompts=False`` and a sliding-window config take the row-after-row packing: the same values."""
    _, ours = tiny_pair("llama")
    ids, attn, p, mask = rollout_rows()
    with torch.no_grad():
        a = completion_forward(ours, ids, attn, p, mask, 1.0)["logps"]
        b = completion_forward(ours, ids, attn, p, mask, 1.0, share_prompts=False)["logps"]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
