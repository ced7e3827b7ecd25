"""Rule rewards for examples/grpo_lora.yaml (TRL's reward-function convention, see docs/rl.md).

Each function gets the decoded ``prompts`` and ``completions`` (one entry per completion) and every other
dataset column by name (here ``solution``), and returns one float (or None) per completion.
"""

import re


def correct_sum(prompts, completions, solution, **kwargs):
    """1.0 when the reply contains the right sum as a number of its own, else 0.0."""
    return [1.0 if str(s).strip() in re.findall(r"-?\d+", c) else 0.0 for c, s in zip(completions, solution)]


def brevity(prompts, completions, **kwargs):
    """1 - characters / 60, at least 0: the task asks for the number only, so shorter replies score higher."""
    return [max(0.0, 1.0 - len(c.strip()) / 60) for c in completions]
