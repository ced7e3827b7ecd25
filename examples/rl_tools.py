"""A calculator tool and the rewards of examples/grpo_tools.yaml (GRPO with tools in the rollouts, docs/rl.md).

``calculator`` is given to the policy through the ``tools`` key: its JSON schema (name, description, the
``expression`` parameter) is built from the signature and this docstring and written into every prompt by the chat
template; the policy calls it in the template's tool format, llmtune runs it (with ``tool_timeout``) and appends
the result as a tool message, and the policy answers.

With tools, each completion reaches the reward functions as a conversation (TRL's convention): a list of messages
``{"role": "assistant", "content", "tool_calls"?}`` and ``{"role": "tool", "name", "content"}``.
"""

import ast
import json
import operator
import re

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _eval(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError("only numbers and + - * / // % are allowed")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result.

    Args:
        expression: the arithmetic expression to evaluate, e.g. "37 * 48".
    """
    value = _eval(ast.parse(str(expression), mode="eval").body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _messages(completion):
    """A completion as a list of messages (a plain string is one assistant message)."""
    return completion if isinstance(completion, list) else [{"role": "assistant", "content": str(completion)}]


def correct_answer(prompts, completions, solution, **kwargs):
    """1.0 when the last assistant message (the answer after any tool calls) holds the right number, else 0.0."""
    out = []
    for completion, gold in zip(completions, solution):
        answers = [m for m in _messages(completion) if m["role"] == "assistant" and not m.get("tool_calls")]
        text = answers[-1]["content"] if answers else ""
        out.append(1.0 if str(gold).strip() in re.findall(r"-?\d+", text.replace(",", "")) else 0.0)
    return out


def _is_error(result):
    """Whether a tool message is llmtune's ``{"error": ...}`` result."""
    try:
        return isinstance(json.loads(result), dict) and "error" in json.loads(result)
    except ValueError:
        return False


def tool_call(prompts, completions, **kwargs):
    """A small shaping reward for calling the calculator (a small weight in grpo_tools.yaml): 1.0 when a call ran
    without error, 0.5 when a call was parsed but failed, 0.25 when the text opens a ``<tool_call>`` that could not
    be parsed, else 0.0."""
    out = []
    for completion in completions:
        messages = _messages(completion)
        results = [m["content"] for m in messages if m["role"] == "tool"]
        if any(not _is_error(r) for r in results):
            out.append(1.0)
        elif results or any(m.get("tool_calls") for m in messages):
            out.append(0.5)
        else:
            out.append(0.25 if any("<tool_call>" in m["content"] for m in messages) else 0.0)
    return out


def plot(run_dir, png):
    """Draw ``reward``, ``rewards/correct_answer/mean``, ``rewards/tool_call/mean`` and ``tools/call_frequency`` per step of a run's
    ``trainer_log.jsonl`` into ``png`` (matplotlib, imported here only)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = [json.loads(line) for line in (Path(run_dir) / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in [("reward", "reward (weighted sum)"), ("rewards/correct_answer/mean", "correct answer"),
                       ("rewards/tool_call/mean", "tool-call reward"),
                       ("tools/call_frequency", "tool calls per completion")]:
        pts = [(e["current_steps"], e[key]) for e in log if key in e]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_title("GRPO with a calculator tool (examples/grpo_tools.yaml)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    plot(sys.argv[1], sys.argv[2])
