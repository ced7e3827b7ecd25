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
    """1.0 when the completion made at least one calculator call that ran without error, else 0.0 (a small weight
    in grpo_tools.yaml: it rewards a well-formed call, the first thing the policy has to learn)."""
    out = []
    for completion in completions:
        results = [m["content"] for m in _messages(completion) if m["role"] == "tool"]
        ok = [r for r in results if not _is_error(r)]
        out.append(1.0 if ok else 0.0)
    return out
