"""Reward functions for online RL (GRPO): loading them by name, built-ins, and scoring completions.

A reward function follows TRL's convention (``GRPOTrainer``'s ``reward_funcs``)::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

called with keyword arguments: ``prompts`` and ``completions`` hold one entry per completion (a prompt repeated
for each of its ``num_generations`` completions), and every other dataset column of those rows arrives by
its name (``solution=[...]``); a function takes the columns it needs and ``**kwargs`` for the rest. ``None``
means "no opinion" on that completion (it is left out of the weighted sum).

:func:`load_reward_funcs` reads the ``reward_funcs`` key: a comma list of ``path/to/file.py:function`` (a
file of the user's own, imported with :mod:`importlib`), ``package.module:function``, built-in names
(:data:`BUILTIN_REWARDS`) or reward-model folders (given to a loader the caller supplies).
:func:`compute_rewards` calls them and combines their outputs with ``reward_weights``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from llmtune.errors import LLMTuneError, nearest

__all__ = [
    "RewardFunc",
    "BUILTIN_REWARDS",
    "extract_answer",
    "answers_match",
    "accuracy_reward",
    "format_reward",
    "make_format_reward",
    "load_callable",
    "load_reward_funcs",
    "parse_reward_weights",
    "compute_rewards",
    "reward_metrics",
]

#: ``fn(prompts, completions, **columns) -> list[float | None]`` (TRL's reward-function convention).
RewardFunc = Callable[..., Sequence[Optional[float]]]


# ---------------------------------------------------------------------------------------------------
# built-in rewards
# ---------------------------------------------------------------------------------------------------
def _text(x: Any) -> str:
    """A completion or prompt as text: a str, or the last message's ``content`` of a conversation."""
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple)) and x and isinstance(x[-1], Mapping):
        return str(x[-1].get("content", ""))
    return "" if x is None else str(x)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched; None if absent/unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
        j += 1
    return None


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a solution or completion, as a string (None when the text is empty).

    Looks inside the last ``<answer>...</answer>`` when there is one (DeepSeek-R1's format), then takes, in
    order: the content of the last ``\\boxed{}`` (the MATH / Qwen-Math convention, Hendrycks et al. 2021); the
    line after the last ``####`` (GSM8K, Cobbe et al. 2021); the whole text when it is one number (``1,234.5``,
    ``3/4``, ``\\frac{3}{4}``); the last number in it; else the whole (stripped) text.
    """
    text = _text(text)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        text = tags[-1]
    text = text.strip()
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        after = text.rsplit("####", 1)[1].strip()
        return after.splitlines()[0].strip() if after else None
    if _as_number(text) is not None:
        return text
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else text


def _as_number(s: str) -> Optional[float]:
    t = s.strip().strip("$").replace(",", "").rstrip(".").strip()
    t = t.removesuffix("%").strip()
    try:
        return float(t)
    except ValueError:
        m = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)/(-?\d+)", t)
        if m:
            a, b = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
            return float(a) / float(b) if float(b) else None
        return None


def answers_match(pred: Optional[str], gold: Optional[str]) -> bool:
    """Whether two final answers agree: equal numbers (``"1,000"`` = ``"1000.0"``, ``"\\frac{1}{2}"`` = ``"0.5"``,
    relative tolerance 1e-6), else equal text after removing spaces, ``$`` and a trailing period, ignoring case."""
    if pred is None or gold is None:
        return False
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)

    def norm(s: str) -> str:
        return re.sub(r"\s+", "", s).strip("$").rstrip(".").lower()

    return norm(pred) == norm(gold)


def accuracy_reward(prompts: Sequence[Any], completions: Sequence[Any], solution: Optional[Sequence[Any]] = None,
                    answer: Optional[Sequence[Any]] = None, **columns: Any) -> list[Optional[float]]:
    """1.0 when the completion's final answer equals the reference answer, else 0.0 (exact match).

    Both sides go through :func:`extract_answer` (a reference without a marker is used whole) and are compared
    with :func:`answers_match`. The reference is the ``solution`` column, else ``answer``; a row whose
    reference is ``None`` or empty gets ``None``.

    Raises:
        LLMTuneError: the dataset has neither a ``solution`` nor an ``answer`` column.
    """
    gold_col = solution if solution is not None else answer
    if gold_col is None:
        found = ", ".join(sorted(columns)) or "none"
        raise LLMTuneError("the accuracy reward needs a `solution` or `answer` column in the dataset (other "
                           f"columns given: {found}); map one in dataset_info.json \"columns\"")
    out: list[Optional[float]] = []
    for comp, gold in zip(completions, gold_col):
        gold_text = _text(gold).strip() if gold is not None else ""
        if not gold_text:
            out.append(None)
            continue
        ref = extract_answer(gold_text) or gold_text
        out.append(1.0 if answers_match(extract_answer(_text(comp)), ref) else 0.0)
    return out


#: the default of :func:`format_reward`: a reasoning block then an answer block (DeepSeek-R1's format).
DEFAULT_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"


def make_format_reward(pattern: str = DEFAULT_FORMAT, name: str = "format") -> RewardFunc:
    """A reward function: 1.0 when the whole completion (stripped) matches ``pattern``, else 0.0.

    ``pattern`` is a Python regular expression matched with :func:`re.fullmatch` and ``re.DOTALL`` (``.`` spans
    lines). Raises LLMTuneError for an invalid pattern.
    """
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise LLMTuneError(f"format reward: invalid regular expression {pattern!r}: {exc}") from None

    def fn(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[Optional[float]]:
        return [1.0 if rx.fullmatch(_text(c).strip()) else 0.0 for c in completions]

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"1.0 when the completion matches {pattern!r} (re.fullmatch, DOTALL), else 0.0."
    return fn


#: 1.0 for ``<think>...</think><answer>...</answer>`` (whitespace between allowed), else 0.0.
format_reward = make_format_reward()

#: built-in reward functions by name.
BUILTIN_REWARDS: dict[str, RewardFunc] = {"accuracy": accuracy_reward, "format": format_reward}


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------
def _load_file(path: Path, entry: str, key: str = "reward_funcs"):
    if not path.is_file():
        raise LLMTuneError(f"{key}: {entry!r}: no file {path}")
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"llmtune_reward_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise LLMTuneError(f"{key}: {entry!r}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    sys.path.insert(0, str(path.parent))  # the file may import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise LLMTuneError(f"{key}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return module


def load_callable(entry: str, key: str) -> Callable[..., Any]:
    """The function named by ``path/to/file.py:function`` (the user's file, imported with :mod:`importlib`; its
    folder is on ``sys.path`` while it imports) or ``package.module:function``.

    Args:
        entry: the text of one entry (str); key: the config key it came from, named in errors
            (``reward_funcs``, ``tools``).

    Raises:
        LLMTuneError: one line naming ``key`` and ``entry``: no ``:``, a missing file or module, a file that fails
            to import (with its error), a missing function (with the nearest name), or a value that is not callable.
    """
    if ":" not in entry:
        raise LLMTuneError(f"{key}: {entry!r} must read path/to/file.py:function or package.module:function")
    target, fn_name = entry.rsplit(":", 1)
    if not target or not fn_name:
        raise LLMTuneError(f"{key}: {entry!r} must read path/to/file.py:function or package.module:function")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if is_file:
        module, where = _load_file(Path(target).expanduser(), entry, key), target
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise LLMTuneError(f"{key}: {entry!r}: cannot import module {target}: "
                               f"{type(exc).__name__}: {exc}") from None
        where = f"module {target}"
    fn = getattr(module, fn_name, None)
    if fn is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise LLMTuneError(f"{key}: {where} has no function {fn_name!r}" + nearest(fn_name, names)
                           + (f" (its functions: {', '.join(sorted(names))})" if names else ""))
    if not callable(fn):
        raise LLMTuneError(f"{key}: {fn_name} in {where} is a {type(fn).__name__}, not a function")
    return fn


def _resolve(entry: str, reward_model_loader: Optional[Callable[[str], RewardFunc]]) -> tuple[str, RewardFunc]:
    if entry in BUILTIN_REWARDS:
        return entry, BUILTIN_REWARDS[entry]
    if os.path.isdir(entry):
        if reward_model_loader is None:
            raise LLMTuneError(f"reward_funcs: {entry!r} is a folder; reward models are not supported here")
        fn = reward_model_loader(entry)
        return Path(entry).name or "reward_model", fn
    if ":" not in entry:
        raise LLMTuneError(f"reward_funcs: unknown reward {entry!r}: give a built-in name "
                           f"({', '.join(BUILTIN_REWARDS)}), path/to/file.py:function, package.module:function "
                           "or a reward model folder." + nearest(entry, BUILTIN_REWARDS))
    fn = load_callable(entry, "reward_funcs")
    return getattr(fn, "__name__", entry.rsplit(":", 1)[1]), fn


def load_reward_funcs(spec: str | Sequence[str],
                      reward_model_loader: Optional[Callable[[str], RewardFunc]] = None
                      ) -> list[tuple[str, RewardFunc]]:
    """Resolve the ``reward_funcs`` key to ``[(name, function), ...]`` in the given order.

    Args:
        spec: a comma-separated str (or a list) of entries, each one of: a built-in name (:data:`BUILTIN_REWARDS`:
            ``accuracy``, ``format``); ``path/to/file.py:function`` (the user's file, imported with
            :mod:`importlib`; its folder is on ``sys.path`` while it imports); ``package.module:function``; an
            existing folder, passed to ``reward_model_loader``.
        reward_model_loader: ``folder -> reward function`` for reward-model folders (an ``rm`` stage output);
            ``None`` rejects folders.

    Returns:
        ``[(name, fn)]``: ``name`` is the function's ``__name__`` (the built-in's name, the folder's name), used in
        the metric ``rewards/<name>/mean``; a repeated name gets a ``_2``, ``_3``... suffix.

    Raises:
        LLMTuneError: an empty spec, an unknown name (with the nearest built-in), a missing file or module, a file
            that fails to import (with its error), a missing or non-callable function.
    """
    entries = [e.strip() for e in (spec.split(",") if isinstance(spec, str) else spec)]
    entries = [e for e in entries if e]
    if not entries:
        raise LLMTuneError("reward_funcs is empty: name at least one reward function (e.g. reward_funcs: accuracy)")
    out: list[tuple[str, RewardFunc]] = []
    seen: dict[str, int] = {}
    for e in entries:
        name, fn = _resolve(e, reward_model_loader)
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}_{seen[name]}", fn))
    return out


def parse_reward_weights(spec: Optional[str | Sequence[float]], num_funcs: int) -> list[float]:
    """``reward_weights`` as floats: a comma-separated str or a list; ``None`` = 1.0 for every function.

    Raises:
        LLMTuneError: a value that is not a finite number, or a count different from ``num_funcs``.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return [1.0] * num_funcs
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        weights = [float(x) for x in items]
    except (TypeError, ValueError):
        raise LLMTuneError(f"reward_weights must be a comma list of numbers (got {spec!r})") from None
    if not all(math.isfinite(w) for w in weights):
        raise LLMTuneError(f"reward_weights must be finite numbers (got {spec!r})")
    if len(weights) != num_funcs:
        raise LLMTuneError(f"reward_weights has {len(weights)} values but reward_funcs names {num_funcs} "
                           "functions: give one weight per function")
    return weights


# ---------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------
def _where(name: str, fn: Any) -> str:
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "__call__", None), "__code__", None)
    if code is not None:
        return f"reward function {name} ({code.co_filename}:{code.co_firstlineno})"
    return f"reward function {name}"


def _as_reward(v: Any) -> Optional[float]:
    """A returned value as float, NaN for None/NaN; raises TypeError/ValueError otherwise."""
    if v is None:
        return math.nan
    if isinstance(v, (str, bytes)) or not hasattr(v, "__float__"):
        raise TypeError(f"{v!r} ({type(v).__name__})")
    if isinstance(v, torch.Tensor) and v.numel() != 1:
        raise TypeError(f"a tensor of shape {tuple(v.shape)}")
    f = float(v)
    if math.isinf(f):
        raise ValueError(f"{f}")
    return f


def compute_rewards(funcs: Sequence[tuple[str, RewardFunc]], weights: Optional[Sequence[float]],
                    prompts: Sequence[Any], completions: Sequence[Any],
                    columns: Optional[Mapping[str, Sequence[Any]]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Call every reward function on the completions and combine them (TRL's ``sum_then_normalize`` sum).

    ``per_func[i, j]`` is function ``j``'s reward of completion ``i`` (NaN where it returned ``None`` or NaN) and
    ``rewards[i] = nansum_j(weights[j] * per_func[i, j])``, NaN when every function returned ``None`` (TRL marks
    such a completion unscorable; :func:`llmtune.losses.group_advantages` then gives it advantage 0).

    Args:
        funcs: ``[(name, fn)]`` from :func:`load_reward_funcs`.
        weights: one float per function; ``None`` = all 1.0.
        prompts, completions: ``N`` entries each (decoded text, or conversations as lists of messages).
        columns: other dataset columns, each a sequence of ``N`` values, passed by name (keys ``prompts`` and
            ``completions`` are not passed again).

    Returns:
        ``(rewards (N,), per_func (N, F))`` float32 on the CPU.

    Raises:
        LLMTuneError: one message naming the function and its file (and line) when it raises, returns something
            that is not a list of ``N`` values, or a value that is not a number or ``None`` (or is infinite);
            weights of the wrong count; prompts and completions of different lengths.
    """
    n = len(completions)
    if len(prompts) != n:
        raise LLMTuneError(f"compute_rewards: {len(prompts)} prompts for {n} completions")
    w = [1.0] * len(funcs) if weights is None else [float(x) for x in weights]
    if len(w) != len(funcs):
        raise LLMTuneError(f"reward_weights has {len(w)} values but there are {len(funcs)} reward functions")
    kwargs = {k: v for k, v in (columns or {}).items() if k not in ("prompts", "completions")}
    for k, v in kwargs.items():
        if len(v) != n:
            raise LLMTuneError(f"compute_rewards: column {k!r} has {len(v)} values for {n} completions")
    per_func = torch.full((n, len(funcs)), math.nan, dtype=torch.float32)
    for j, (name, fn) in enumerate(funcs):
        try:
            out = fn(prompts=list(prompts), completions=list(completions), **kwargs)
        except LLMTuneError:
            raise
        except Exception as exc:
            raise LLMTuneError(f"{_where(name, fn)} raised {type(exc).__name__}: {exc}") from None
        try:
            values = list(out)
        except TypeError:
            raise LLMTuneError(f"{_where(name, fn)} returned a {type(out).__name__}; it must return a list of "
                               f"{n} floats (or None), one per completion") from None
        if len(values) != n:
            raise LLMTuneError(f"{_where(name, fn)} returned {len(values)} values for {n} completions; it must "
                               "return one float (or None) per completion")
        for i, v in enumerate(values):
            try:
                per_func[i, j] = _as_reward(v)
            except (TypeError, ValueError) as exc:
                raise LLMTuneError(f"{_where(name, fn)} returned {exc} for completion {i}; a reward must be a "
                                   "finite number or None") from None
    wt = torch.tensor(w, dtype=torch.float32)
    rewards = (per_func * wt).nansum(dim=1)
    rewards[torch.isnan(per_func).all(dim=1)] = math.nan
    return rewards, per_func


def _nanstd(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Standard deviation ignoring NaN, Bessel-corrected; NaN with fewer than two values (TRL's ``nanstd``)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim)
    var = torch.nansum((x - mean) ** 2, dim=dim) / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, math.nan))


def reward_metrics(rewards: torch.Tensor, per_func: torch.Tensor, names: Sequence[str],
                   num_generations: int) -> dict[str, float]:
    """Reward statistics of a step under TRL's ``GRPOTrainer`` metric names.

    Args:
        rewards: ``(N,)`` from :func:`compute_rewards` (NaN = unscorable); per_func: ``(N, F)``; names: ``F``
            function names; num_generations: ``G`` (groups are consecutive rows). Pass all ranks' rows.

    Returns:
        ``reward`` (mean over scorable completions), ``reward_std`` (their standard deviation, Bessel-corrected),
        ``rewards/<name>/mean`` and ``rewards/<name>/std`` (over the completions the function scored; NaN when it
        scored none), ``frac_reward_zero_std`` (share of completions whose group's rewards all agree).
    """
    out = {"reward": float(torch.nanmean(rewards)), "reward_std": float(_nanstd(rewards.reshape(-1), dim=0))}
    for j, name in enumerate(names):
        out[f"rewards/{name}/mean"] = float(torch.nanmean(per_func[:, j]))
        out[f"rewards/{name}/std"] = float(_nanstd(per_func[:, j], dim=0))
    if num_generations > 1:
        std = _nanstd(rewards.reshape(-1, num_generations), dim=1)
        zero = torch.isclose(std, torch.zeros_like(std))
    else:
        zero = torch.ones(rewards.numel(), dtype=torch.bool)
    out["frac_reward_zero_std"] = float(zero.float().mean())
    return out
