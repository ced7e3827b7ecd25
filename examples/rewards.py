"""Rule rewards for examples/grpo_lora.yaml (TRL's reward-function convention, see docs/rl.md).

Each function gets the decoded ``prompts`` and ``completions`` (one entry per completion) and every other
dataset column by name (here ``solution``), and returns one float (or None) per completion.
"""

import re

_NUMBER = re.compile(r"-?\d+")


def number_only(prompts, completions, **kwargs):
    """1.0 when the reply is a bare integer (spaces and a final period allowed), else 0.0."""
    return [1.0 if re.fullmatch(r"\s*-?\d+\.?\s*", c) else 0.0 for c in completions]


def correct_sum(prompts, completions, solution, **kwargs):
    """1.0 when the first integer of the reply is the right sum, else 0.0."""
    out = []
    for c, s in zip(completions, solution):
        m = _NUMBER.search(c)
        out.append(1.0 if m and m.group() == str(s).strip() else 0.0)
    return out
