"""Tools in GRPO rollouts (llmtune.rl_tools): schemas, loading, running with a deadline, multi-turn rollouts whose
tool-result tokens carry no loss, and the tool example's reward rising on the real model.

References: transformers' ``get_json_schema`` (the schema layout, test-only), hand-written tool-call texts and the
SmolLM2 tokenizer's encoding of the tool turn written out by hand (the completion mask's positions).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from llmtune.errors import LLMTuneError
from llmtune.models import ModelConfig, Transformer
from llmtune.rl_tools import (ToolsTemplate, call_tool, function_schema, generate_tool_rollouts, load_tools,
                              tool_metrics, tool_suffix_ids)

ROOT = Path(__file__).resolve().parents[1]


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number.
        b: the second number.
    """
    return a + b


def scale(values: list[float], factor: Optional[float] = None, unit: str = "m") -> list:
    """Scale numbers by a factor.

    Args:
        values: the numbers to scale.
        factor: the factor (none: 1).
        unit: the unit of the result.
    """
    return [v * (factor or 1) for v in values]


def boom(x: int) -> int:
    """Always fails."""
    raise ZeroDivisionError("division by zero in boom")


SLEEPY_DONE = threading.Event()


def sleepy(x: int) -> int:
    """Hangs (300 s: far past any rollout here), then marks that it finished."""
    time.sleep(300)
    SLEEPY_DONE.set()
    return x


# ---------------------------------------------------------------------------------------------------------------
# schemas and loading
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [add, scale])
def test_schema_matches_transformers_get_json_schema(fn):
    utils = pytest.importorskip("transformers.utils")
    ref = utils.get_json_schema(fn)
    ours = function_schema(fn)
    assert ours["type"] == ref["type"] == "function"
    f, r = ours["function"], ref["function"]
    assert f["name"] == r["name"] and f["description"] == r["description"]
    assert f["parameters"].get("required", []) == r["parameters"].get("required", [])
    for name, prop in r["parameters"]["properties"].items():
        mine = f["parameters"]["properties"][name]
        assert mine["type"] == prop["type"], name
        assert mine["description"] == prop["description"], name
        if "items" in prop:
            assert mine["items"] == prop["items"]
        assert bool(mine.get("nullable")) == bool(prop.get("nullable")), name


def test_load_tools_reads_files_and_modules(tmp_path):
    (tmp_path / "t.py").write_text("def double(x: int) -> int:\n    '''Double x.'''\n    return 2 * x\nVALUE = 3\n")
    tools = load_tools(f"{tmp_path / 't.py'}:double, json:dumps")
    assert [n for n, _ in tools] == ["double", "dumps"] and tools[0][1](x=4) == 8


@pytest.mark.parametrize("entry, words", [
    ("{d}/missing.py:f", ["tools", "missing.py", "no file"]),
    ("{d}/t.py:tripple", ["tools", "t.py", "no function 'tripple'", "double"]),
    ("{d}/t.py:VALUE", ["tools", "VALUE", "not a function"]),
    ("no_such_module_xyz:f", ["tools", "no_such_module_xyz", "cannot import"]),
    ("double", ["tools", "path/to/file.py:function"]),
])
def test_bad_tools_entries_are_one_clear_line(tmp_path, entry, words):
    (tmp_path / "t.py").write_text("def double(x: int) -> int:\n    '''Double x.'''\n    return 2 * x\nVALUE = 3\n")
    with pytest.raises(LLMTuneError) as err:
        load_tools(entry.format(d=tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("value", ["0", "-1"])
def test_tool_timeout_must_be_positive(value):
    from llmtune.config import parse_config

    with pytest.raises(LLMTuneError) as err:
        parse_config(["--stage", "grpo", "--model_name_or_path", "m", "--num_generations", "2",
                      "--per_device_train_batch_size", "2", "--dataset", "d", "--output_dir", "o",
                      "--tool_timeout", value], command="train")
    assert "tool_timeout" in str(err.value) and "\n" not in str(err.value).strip()


def test_trl_key_name_is_an_alias():
    from llmtune.config import parse_config

    cfg = parse_config({"stage": "grpo", "model_name_or_path": "m", "max_tool_calling_iterations": 3,
                        "num_generations": 2, "per_device_train_batch_size": 2, "dataset": "d", "output_dir": "o"}, command="train")
    assert cfg.max_tool_turns == 3 and cfg.tool_timeout == 5.0 and cfg.tools is None


# ---------------------------------------------------------------------------------------------------------------
# running tools
# ---------------------------------------------------------------------------------------------------------------
def test_call_tool_results_and_errors():
    tools = {"add": add, "boom": boom, "sleepy": sleepy}
    assert call_tool(tools, "add", '{"a": 2, "b": 3}', 1.0) == ("5", True)
    assert call_tool(tools, "add", {"a": 2, "b": 3}, 1.0) == ("5", True)
    text, ok = call_tool(tools, "boom", {"x": 1}, 1.0)
    assert not ok and json.loads(text) == {"error": "boom raised ZeroDivisionError: division by zero in boom"}
    t0 = time.perf_counter()
    text, ok = call_tool(tools, "sleepy", {"x": 1}, 0.3)
    assert time.perf_counter() - t0 < 5 and not ok and json.loads(text) == {"error": "sleepy timed out after 0.3 s"}
    text, ok = call_tool(tools, "nope", {}, 1.0)
    assert not ok and "Tool nope not found" in json.loads(text)["error"]
    text, ok = call_tool(tools, "add", "[1, 2]", 1.0)
    assert not ok and "JSON object" in json.loads(text)["error"]
    text, ok = call_tool(tools, "add", {"a": 1}, 1.0)   # a missing argument is the tool's TypeError
    assert not ok and "TypeError" in json.loads(text)["error"]


def test_tool_metrics_are_trls():
    m = tool_metrics(torch.tensor([2, 0, 1, 1]), torch.tensor([1, 0, 0, 1]))
    assert m == {"tools/call_frequency": 1.0, "tools/failure_frequency": 0.5}
    assert tool_metrics(torch.tensor([0, 0]), torch.tensor([0, 0]))["tools/failure_frequency"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# multi-turn rollouts on a tiny random model with the real tokenizer and template
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(real_model_path):
    from llmtune.tokenizer import load_tokenizer

    return load_tokenizer(str(real_model_path))


def tiny_model(vocab: int) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return Transformer(cfg).float().eval()


class Scripted:
    """The real tokenizer, but ``decode`` of a generated turn returns the next scripted text (the rollout decodes
    each row's turns in row order, turn after turn), so the model's tool calls are known in advance."""

    def __init__(self, tok, texts):
        self.tok, self.texts = tok, list(texts)

    def decode(self, ids, skip_special_tokens=True):
        return self.texts.pop(0)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def call_text(name, **args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def test_tool_rollout_masks_tool_tokens_and_survives_raising_and_hanging_tools(tok):
    from llmtune.data.templates import get_template

    tpl = get_template("chatml", tok, tool_format="qwen")
    model = tiny_model(len(tok))
    prompt = tpl.encode_prompt([{"role": "user", "content": "What is 2 + 3?"}])
    # every id stops: each generated turn is exactly one token, so the layout is known to the token
    every = list(range(model.config.vocab_size))
    # rows 0..3 (one prompt, 4 completions). Turn 0: add / boom / sleepy / a plain answer; turn 1: rows 0-2
    # answer; row 3 is done.
    script = Scripted(tok, [call_text("add", a=2, b=3), call_text("boom", x=1), call_text("sleepy", x=1), "5",
                            "It is 5", "sorry", "sorry"])
    t0 = time.perf_counter()
    out = generate_tool_rollouts(model, [prompt], tokenizer=script, template=tpl,
                                 tools={"add": add, "boom": boom, "sleepy": sleepy}, max_new_tokens=200,
                                 max_tool_turns=2, tool_timeout=0.5, num_return_sequences=4, eos_token_ids=every,
                                 do_sample=False, pad_token_id=0, return_logps=True)
    # the rollout returned while the hanging tool was still running (it got its timeout, not the tool's 300 s);
    # no wall-clock bound: a loaded machine may take long for the rest
    assert not SLEEPY_DONE.is_set() or time.perf_counter() - t0 < 300
    ro = out.rollout
    results = ["5", json.dumps({"error": "boom raised ZeroDivisionError: division by zero in boom"}),
               json.dumps({"error": "sleepy timed out after 0.5 s"})]
    # the tool turn as ChatML writes it after the assistant's <|im_end|>, tokenized independently
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for i in range(4):
        comp = ro.completion_ids[i, :int(ro.completion_lengths[i])].tolist()
        mask = ro.completion_mask[i, :len(comp)].tolist()
        if i == 3:
            assert len(comp) == 1 and mask == [1] and out.conversations[i] == [{"role": "assistant", "content": "5"}]
            assert out.tool_calls[i] == 0
            continue
        suffix = tok.encode("\n", add_special_tokens=False) + \
            tok.encode(f"<|im_start|>tool\n{results[i]}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        assert tool_suffix_ids(tpl, ["add", "boom", "sleepy"][i], results[i]) == suffix
        assert comp[1:1 + len(suffix)] == suffix and len(comp) == len(suffix) + 2
        assert mask == [1] + [0] * len(suffix) + [1]   # generated tokens 1, the tool turn 0
        assert ro.attention_mask[i, ro.prompt_len:ro.prompt_len + len(comp)].tolist() == [1] * len(comp)
        assert ro.logps[i, 1:1 + len(suffix)].abs().sum() == 0 and ro.logps[i, 0] < 0 and ro.logps[i, -1 + len(comp)] < 0
        conv = out.conversations[i]
        assert [m["role"] for m in conv] == ["assistant", "tool", "assistant"]
        assert conv[1]["content"] == results[i] and conv[0]["tool_calls"][0]["function"]["name"] == ["add", "boom",
                                                                                                       "sleepy"][i]
        assert out.tool_calls[i] == 1 and out.tool_failures[i] == (i > 0)
    assert im_end in tpl.stop_token_ids
    assert not ro.truncated.any()


def test_tool_turns_stop_at_max_tool_turns_and_the_budget(tok):
    from llmtune.data.templates import get_template

    tpl = get_template("chatml", tok, tool_format="qwen")
    model = tiny_model(len(tok))
    prompt = tpl.encode_prompt([{"role": "user", "content": "Add."}])
    every = list(range(model.config.vocab_size))
    # max_tool_turns 1: the second call is not run (it stays the final assistant message)
    script = Scripted(tok, [call_text("add", a=1, b=1), call_text("add", a=2, b=2)])
    out = generate_tool_rollouts(model, [prompt], tokenizer=script, template=tpl, tools={"add": add},
                                 max_new_tokens=200, max_tool_turns=1, num_return_sequences=1, eos_token_ids=every,
                                 do_sample=False)
    assert [m["role"] for m in out.conversations[0]] == ["assistant", "tool", "assistant"]
    assert out.tool_calls.tolist() == [1] and not script.texts
    # a budget too small for the tool turn: the call is run but not appended, the completion ends with it
    script = Scripted(tok, [call_text("add", a=1, b=1)])
    out = generate_tool_rollouts(model, [prompt], tokenizer=script, template=tpl, tools={"add": add},
                                 max_new_tokens=5, max_tool_turns=2, eos_token_ids=every, do_sample=False)
    assert out.rollout.completion_lengths.tolist() == [1] and len(out.conversations[0]) == 1


def test_tools_template_lists_the_tools_in_the_prompt(tok):
    from llmtune.data.templates import get_template

    tpl = get_template("chatml", tok, tool_format="qwen")
    wrapped = ToolsTemplate(tpl, [function_schema(add)])
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.decode(wrapped.encode_prompt(msgs), skip_special_tokens=False)
    assert '"name": "add"' in text and "<tools>" in text
    # a row's own tools come first; a key tool of the same name is not repeated
    own = json.dumps([{"name": "lookup", "description": "d", "parameters": {"type": "object", "properties": {}}}])
    text = tok.decode(wrapped.encode_prompt(msgs, None, own), skip_special_tokens=False)
    assert text.index('"lookup"') < text.index('"add"')
    assert wrapped.encode_prompt(msgs, None, json.dumps([function_schema(add)])) == wrapped.encode_prompt(msgs)
    assert wrapped.tool_format == "qwen" and wrapped.stop_token_ids == tpl.stop_token_ids


# ---------------------------------------------------------------------------------------------------------------
# the example on the real model
# ---------------------------------------------------------------------------------------------------------------
#: the shortened example: steps, and how much the tool-call reward of the last third must exceed the first third's
STEPS, MARGIN = 6, 0.15


def _log(folder):
    return [json.loads(line) for line in (Path(folder) / "trainer_log.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.real
def test_the_tool_example_learns_to_call_the_calculator(tmp_path, real_model_path):
    """examples/grpo_tools.yaml, shortened (STEPS steps, the example's prompts, tool and rewards): the tool-call
    reward (a calculator call that ran) of the last steps must exceed that of the first ones, every step's tool
    metrics are logged, and the run finishes (measured: 7 min 18 s on the shared 2-core machine at load ~20,
    OMP_NUM_THREADS=1; the same config's 12-step run: tool-call reward 0.27 in steps 1-2, 0.67 in steps 5-6)."""
    from llmtune.config import parse_config
    from llmtune.train.setup import run_train

    cfg = parse_config(str(ROOT / "examples" / "grpo_tools.yaml"), command="train")
    ex = ROOT / "examples"
    cfg = cfg.replace(model_name_or_path=str(real_model_path), dataset_dir=str(ex / "data"),
                      tools=f"{ex / 'rl_tools.py'}:calculator",
                      reward_funcs=f"{ex / 'rl_tools.py'}:correct_answer,{ex / 'rl_tools.py'}:tool_call",
                      output_dir=str(tmp_path / "out"), max_steps=STEPS, plot_loss=False)
    run_train(cfg)
    log = _log(tmp_path / "out")
    assert [e["current_steps"] for e in log] == list(range(1, STEPS + 1))
    calls = [e["rewards/tool_call/mean"] for e in log]
    assert all("tools/call_frequency" in e and "tools/failure_frequency" in e for e in log)
    k = STEPS // 3
    assert sum(calls[-k:]) / k > sum(calls[:k]) / k + MARGIN, calls
