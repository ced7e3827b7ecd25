"""Reward functions: built-ins on hand-written cases, loading by spec (file, module, built-in, folder), weighted
sums with None (hand-computed, TRL's nansum convention), and one clear error per misbehaving function."""

from __future__ import annotations

import math
import statistics
import textwrap

import pytest
import torch

from llmtune.errors import LLMTuneError
from llmtune.rewards import (accuracy_reward, answers_match, compute_rewards, extract_answer, format_reward,
                             load_reward_funcs, make_format_reward, parse_reward_weights)


@pytest.mark.parametrize("text,want", [
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{3} then \\boxed{x^{2}}", "x^{2}"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1,234\n", "1,234"),
    ("first 3 apples, then 42.", "42"),
    ("<think>maybe 7</think> <answer>x = 3/4</answer>", "3/4"),
    ("<answer> 12 </answer>", "12"),
    ("<answer>Paris</answer>", "Paris"),
    ("-0.5", "-0.5"),
    ("no digits here", "no digits here"),
    ("   ", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("a,b,want", [("1,000", "1000.0", True), ("\\frac{3}{4}", "0.75", True), ("3/4", "0.75", True),
                                      ("$5", "5", True), ("72.", "72", True), ("Paris", "paris.", True),
                                      ("4", "5", False), (None, "5", False), ("10%", "10", True)])
def test_answers_match(a, b, want):
    assert answers_match(a, b) is want


def test_accuracy_reward_against_gsm8k_style_solutions():
    completions = ["3 + 4 = 7, so \\boxed{7}", "The answer is 8", "<think>..</think><answer>1,000</answer>",
                   "I don't know", "12"]
    solution = ["She has 3 + 4 = 7.\n#### 7", "#### 7", "1000", None, "12"]
    assert accuracy_reward([""] * 5, completions, solution=solution) == [1.0, 0.0, 1.0, None, 1.0]
    # the `answer` column is used when there is no `solution`
    assert accuracy_reward(["", ""], ["42", "41"], answer=["42", "42"]) == [1.0, 0.0]
    # conversational completions: the last message's content
    assert accuracy_reward([""], [[{"role": "assistant", "content": "so 5"}]], solution=["5"]) == [1.0]
    with pytest.raises(LLMTuneError, match="`solution` or `answer` column.*given: level"):
        accuracy_reward([""], ["1"], level=["easy"])


def test_format_rewards():
    comps = ["<think>a\nb</think>\n<answer>4</answer>", "<answer>4</answer>",
             "<think>x</think><answer>4</answer> extra",
             "  <think></think><answer></answer>  "]
    assert format_reward([""] * 4, comps) == [1.0, 0.0, 0.0, 1.0]
    boxed = make_format_reward(r".*\\boxed\{.+\}", name="boxed")
    assert boxed.__name__ == "boxed"
    assert boxed(["", ""], ["x \\boxed{2}", "2"]) == [1.0, 0.0]
    with pytest.raises(LLMTuneError, match="invalid regular expression"):
        make_format_reward("(")


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------
USER_FILE = textwrap.dedent("""
    import helper_mod  # a neighbour module: the file's folder is importable while it loads

    def short(prompts, completions, **kw):
        return [1.0 if len(c) < 5 else 0.0 for c in completions]

    def echo_column(prompts, completions, weight, **kw):
        return [None if w is None else float(w) for w in weight]

    def broken(prompts, completions, **kw):
        return helper_mod.explode()

    def two(prompts, completions, **kw):
        return [1.0, 2.0]

    def words(prompts, completions, **kw):
        return ["high" for _ in completions]

    def maybe(prompts, completions, **kw):
        return [None if c == "?" else 0.5 for c in completions]

    CONSTANT = 3
""")


@pytest.fixture
def user_file(tmp_path):
    (tmp_path / "helper_mod.py").write_text("def explode():\n    raise KeyError('missing key')\n")
    f = tmp_path / "my_rewards.py"
    f.write_text(USER_FILE)
    return f


def test_load_file_module_and_builtins(user_file, tmp_path, monkeypatch):
    pkg = tmp_path / "pkg_rewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text("def score(prompts, completions, **kw):\n    return [0.25] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    funcs = load_reward_funcs(f"accuracy, {user_file}:short,pkg_rewards.scores:score,format,accuracy")
    assert [n for n, _ in funcs] == ["accuracy", "short", "score", "format", "accuracy_2"]
    assert funcs[1][1]([""], ["abc"]) == [1.0]
    assert funcs[2][1]([""], ["abc"]) == [0.25]
    assert load_reward_funcs([f"{user_file}:short"])[0][1] is funcs[1][1]  # the file is imported once


def test_load_errors(user_file, tmp_path):
    with pytest.raises(LLMTuneError, match="unknown reward 'acuracy'.*Did you mean: accuracy"):
        load_reward_funcs("acuracy")
    with pytest.raises(LLMTuneError, match="no file"):
        load_reward_funcs(f"{tmp_path}/nope.py:f")
    with pytest.raises(LLMTuneError, match="has no function 'shrt'.*Did you mean: short"):
        load_reward_funcs(f"{user_file}:shrt")
    with pytest.raises(LLMTuneError, match="CONSTANT .* is a int, not a function"):
        load_reward_funcs(f"{user_file}:CONSTANT")
    with pytest.raises(LLMTuneError, match="cannot import module no_such_pkg_xyz"):
        load_reward_funcs("no_such_pkg_xyz.mod:f")
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n")
    with pytest.raises(LLMTuneError, match=r"importing .*bad.py failed: SyntaxError"):
        load_reward_funcs(f"{bad}:f")
    with pytest.raises(LLMTuneError, match="is a folder"):
        load_reward_funcs(str(tmp_path))
    with pytest.raises(LLMTuneError, match="empty"):
        load_reward_funcs(" , ")


def test_folder_goes_to_the_reward_model_loader(tmp_path):
    rm = tmp_path / "rm_out"
    rm.mkdir()
    seen = []

    def loader(path):
        seen.append(path)
        return lambda prompts, completions, **kw: [0.0] * len(completions)

    funcs = load_reward_funcs(f"{rm},format", reward_model_loader=loader)
    assert seen == [str(rm)] and [n for n, _ in funcs] == ["rm_out", "format"]


def test_parse_reward_weights():
    assert parse_reward_weights(None, 2) == [1.0, 1.0]
    assert parse_reward_weights("0.5, 2", 2) == [0.5, 2.0]
    assert parse_reward_weights([1, 3], 2) == [1.0, 3.0]
    with pytest.raises(LLMTuneError, match="has 1 values but reward_funcs names 2"):
        parse_reward_weights("1", 2)
    with pytest.raises(LLMTuneError, match="comma list of numbers"):
        parse_reward_weights("1,x", 2)


# ---------------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------------
def test_compute_rewards_weighted_nansum(user_file):
    funcs = load_reward_funcs(f"{user_file}:short,{user_file}:maybe,{user_file}:echo_column")
    comps = ["ab", "?", "abcdef", "?"]
    rewards, per = compute_rewards(funcs, [2.0, 4.0, -1.0], ["p"] * 4, comps, {"weight": [0.0, 1, 2, None]})
    nan = math.nan
    want_per = [[1.0, 0.5, 0.0], [1.0, nan, 1.0], [0.0, 0.5, 2.0], [1.0, nan, nan]]
    torch.testing.assert_close(per, torch.tensor(want_per), equal_nan=True)
    # 2*1 + 4*0.5 - 0 = 4 ; 2*1 - 1 = 1 ; 0 + 2 - 2 = 0 ; 2*1 = 2
    assert rewards.tolist() == [4.0, 1.0, 0.0, 2.0]
    # every function says None -> the completion is unscorable (NaN)
    funcs = load_reward_funcs(f"{user_file}:maybe")
    r, _ = compute_rewards(funcs, None, ["p", "p"], ["?", "x"], {})
    assert math.isnan(r[0]) and r[1] == 0.5


def test_misbehaving_reward_functions_get_one_clear_error(user_file):
    f = str(user_file)
    cases = [("broken", r"reward function broken \(.*my_rewards.py:\d+\) raised KeyError: 'missing key'"),
             ("two", r"reward function two \(.*my_rewards.py:\d+\) returned 2 values for 3 completions"),
             ("words", r"reward function words .* returned 'high' \(str\) for completion 0")]
    for name, match in cases:
        funcs = load_reward_funcs(f"{f}:{name}")
        with pytest.raises(LLMTuneError, match=match):
            compute_rewards(funcs, None, ["p"] * 3, ["a", "b", "c"], {})

    def scalar(prompts, completions, **kw):
        return 1.0

    def infinite(prompts, completions, **kw):
        return [float("inf")] * len(completions)

    with pytest.raises(LLMTuneError, match="returned a float; it must return a list of 2 floats"):
        compute_rewards([("scalar", scalar)], None, ["p", "p"], ["a", "b"])
    with pytest.raises(LLMTuneError, match="returned inf for completion 0; a reward must be a finite number"):
        compute_rewards([("infinite", infinite)], None, ["p", "p"], ["a", "b"])
    with pytest.raises(LLMTuneError, match="reward_weights has 2 values"):
        compute_rewards([("scalar", scalar)], [1, 2], ["p"], ["a"])
    # numpy / torch scalars and bools are numbers
    out, _ = compute_rewards([("t", lambda prompts, completions, **kw: [torch.tensor(0.5), True])], None,
                             ["p", "p"], ["a", "b"])
    assert out.tolist() == [0.5, 1.0]


def test_reward_metrics_hand_case():
    from llmtune.rewards import reward_metrics

    nan = math.nan
    per = torch.tensor([[1.0, nan], [1.0, 0.5], [0.0, nan], [1.0, nan]])
    rewards = torch.tensor([1.0, 1.5, 0.0, 1.0])
    m = reward_metrics(rewards, per, ["acc", "fmt"], num_generations=2)
    assert m["reward"] == pytest.approx(3.5 / 4)
    assert m["reward_std"] == pytest.approx(statistics.stdev([1.0, 1.5, 0.0, 1.0]))
    assert m["rewards/acc/mean"] == pytest.approx(0.75)
    assert m["rewards/acc/std"] == pytest.approx(statistics.stdev([1.0, 1.0, 0.0, 1.0]))
    assert m["rewards/fmt/mean"] == 0.5 and math.isnan(m["rewards/fmt/std"])
    assert m["frac_reward_zero_std"] == 0.0  # groups (1, 1.5) and (0, 1) both vary
    m = reward_metrics(torch.tensor([2.0, 2.0, 0.0, 1.0]), per, ["acc", "fmt"], num_generations=2)
    assert m["frac_reward_zero_std"] == 0.5
