"""Data pipeline on the real demo datasets with the real SmolLM2 tokenizer.

Expected token sequences are built from the ChatML definition written out here, every piece tokenized on
its own: ``<|im_start|>`` + role + "\\n" + content + ``<|im_end|>`` + "\\n"; SmolLM2's own chat template adds
the system prompt "You are a helpful AI assistant named SmolLM, trained by Hugging Face" when a conversation
has none. Trained tokens (labels != -100) of an assistant turn are its content and ``<|im_end|>``.
"""

from __future__ import annotations

import json

import pytest

from llmtune.data import get_collator, get_dataset, get_template
from llmtune.data.registry import load_registry
from llmtune.errors import LLMTuneError

pytestmark = pytest.mark.real
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IGN = -100


@pytest.fixture(scope="module")
def tok(real_model_path):
    from llmtune import load_tokenizer

    return load_tokenizer(str(real_model_path))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def _expected(tok, system, turns):
    """ids, labels of a ChatML conversation from independently tokenized pieces (see module docstring)."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    enc = lambda s: tok.encode(s, add_special_tokens=False) if s else []  # noqa: E731
    ids, labels = [], []
    all_turns = ([("system", system)] if system is not None else []) + list(turns)
    for i, (role, content) in enumerate(all_turns):
        head = [start] + enc(role + "\n")
        body = enc(content) + [end]
        trained = role == "assistant"
        ids += head + body
        labels += [IGN] * len(head) + (body if trained else [IGN] * len(body))
        if i < len(all_turns) - 1:
            nl = enc("\n")
            ids += nl
            labels += [IGN] * len(nl)
    return ids, labels


def run(tok, cache, dataset, stage, template=None, **kw):
    from shared_inputs import data_dir

    args = {"dataset": dataset, "dataset_dir": str(data_dir()), "cutoff_len": 4096, "cache_dir": cache}
    args.update(kw)
    return get_dataset(args, tok, get_template(template, tok), stage)


def _stage_of(entry: dict) -> list[str]:
    cols = entry.get("columns", {})
    if entry.get("ranking"):
        return ["dpo", "rm"]
    if "kto_tag" in cols:
        return ["kto"]
    if cols.get("prompt") == "text" or str(entry.get("file_name", "")).endswith(".txt"):
        return ["pt"]
    return ["sft"]


def test_every_registered_dataset(tok, cache, shared_data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = load_registry(str(shared_data_dir))
    loaded, missing, offline, other = [], [], [], []
    for name, entry in info.items():
        for stage in _stage_of(entry):
            if "file_name" in entry and not any(k in entry for k in ("hf_hub_url", "ms_hub_url", "om_hub_url")):
                path = shared_data_dir / entry["file_name"]
                if path.exists():
                    s = run(tok, cache, name, stage, max_samples=12, cutoff_len=256)
                    assert s.train, name
                    batch = get_collator(stage, tok.pad_token_id)(s.train[:4])
                    assert batch["input_ids"].shape[-1] <= 256
                    if stage != "ppo":
                        lab = batch["labels"]
                        assert (lab != IGN).any(), name
                    loaded.append((name, stage))
                else:
                    with pytest.raises(LLMTuneError) as err:
                        run(tok, cache, name, stage)
                    msg = str(err.value)
                    assert repr(name) in msg and entry["file_name"] in msg and str(shared_data_dir) in msg, msg
                    missing.append(name)
            elif "hf_hub_url" in entry:
                with pytest.raises(LLMTuneError) as err:
                    run(tok, cache, name, stage)
                assert f"{name!r} is hosted on the Hugging Face Hub" in str(err.value)
                assert "can't be reached" in str(err.value)
                offline.append(name)
            else:
                with pytest.raises(LLMTuneError, match="ModelScope|Modelers"):
                    run(tok, cache, name, stage)
                other.append(name)
    assert {n for n, _ in loaded} == {"identity", "alpaca_en_demo", "glaive_toolcall_en_demo", "dpo_en_demo",
                                      "kto_en_demo", "wiki_demo", "c4_demo"}
    assert ("dpo_en_demo", "rm") in loaded and ("kto_en_demo", "kto") in loaded and ("wiki_demo", "pt") in loaded
    assert "mllm_demo" in missing and "alpaca_en" in offline and "deepctrl" in other


def test_alpaca_example_tokens(tok, cache):
    from shared_inputs import data_dir

    row = json.loads((data_dir() / "alpaca_en_demo.json").read_text())[1]
    ids, labels = _expected(tok, SMOL_SYSTEM, [("user", row["instruction"]), ("assistant", row["output"])])
    got = run(tok, cache, "alpaca_en_demo", "sft", max_samples=2).train[1]
    assert got["input_ids"] == ids and got["labels"] == labels
    # the built-in chatml template: no default system prompt
    ids, labels = _expected(tok, None, [("user", row["instruction"]), ("assistant", row["output"])])
    got = run(tok, cache, "alpaca_en_demo", "sft", template="chatml", max_samples=2).train[1]
    assert got["input_ids"] == ids and got["labels"] == labels


def test_multiturn_sharegpt_tokens(tok, cache):
    from shared_inputs import data_dir

    conv = json.loads((data_dir() / "glaive_toolcall_en_demo.json").read_text())[1]["conversations"]
    turns = [("user" if m["from"] == "human" else "assistant", m["value"]) for m in conv]
    ids, labels = _expected(tok, SMOL_SYSTEM, turns)
    got = run(tok, cache, "glaive_toolcall_en_demo", "sft", max_samples=2).train[1]
    assert got["input_ids"] == ids and got["labels"] == labels


def test_tool_call_tokens_chatml(tok, cache):
    from shared_inputs import data_dir

    row = json.loads((data_dir() / "glaive_toolcall_en_demo.json").read_text())[0]
    tool = json.loads(row["tools"])[0]
    # LLaMA-Factory's default tool format (ChatML has no tool format of its own), written out by hand
    system = ("You have access to the following tools:\n"
              f"> Tool Name: {tool['name']}\nTool Description: {tool['description']}\nTool Args:\n"
              "  - ingredients (array, required): The ingredients to search for, where each item should be string\n\n"
              "Use the following format if using a tool:\n```\nAction: tool name (one of [search_recipes])\n"
              "Action Input: the input to the tool, in a JSON format representing the kwargs "
              "(e.g. ```{\"input\": \"hello world\", \"num_beams\": 5}```)\n```\n")
    turns = []
    for m in row["conversations"]:
        if m["from"] == "function_call":
            call = json.loads(m["value"])
            turns.append(("assistant", f"Action: {call['name']}\nAction Input: {json.dumps(call['arguments'])}"))
        else:
            turns.append(({"human": "user", "gpt": "assistant", "observation": "tool"}[m["from"]], m["value"]))
    ids, labels = _expected(tok, system, turns)
    got = run(tok, cache, "glaive_toolcall_en_demo", "sft", template="chatml", max_samples=1).train[0]
    assert got["input_ids"] == ids and got["labels"] == labels


def test_preference_pair_tokens(tok, cache):
    from shared_inputs import data_dir

    row = json.loads((data_dir() / "dpo_en_demo.json").read_text())[0]
    prompt = [("user", m["value"]) for m in row["conversations"]]
    got = run(tok, cache, "dpo_en_demo", "dpo", max_samples=1).train[0]
    for key in ("chosen", "rejected"):
        ids, labels = _expected(tok, SMOL_SYSTEM, prompt + [("assistant", row[key]["value"])])
        assert got[f"{key}_input_ids"] == ids and got[f"{key}_labels"] == labels


@pytest.mark.parametrize("name", ["alpaca_en_demo", "identity"])
def test_trained_tokens_are_exactly_the_answers(tok, cache, name):
    from shared_inputs import data_dir

    rows = json.loads((data_dir() / f"{name}.json").read_text())
    enc = run(tok, cache, name, "sft").train
    assert len(enc) == len(rows)
    for raw, row in zip(rows, enc):
        trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGN]
        assert trained == [lab for lab in row["labels"] if lab != IGN]
        assert tok.decode(trained) == raw["output"] + "<|im_end|>"


def test_jinja_spans_match_whole_rendering(tok):
    """Concatenated prompt/response spans == the whole conversation rendered in one go by Jinja (the
    model's chat_template, rendered here directly in jinja2's sandbox as transformers does)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    render = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(tok.chat_template).render
    tpl = get_template(None, tok)
    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]
    for system in (None, "Be brief."):
        msgs = ([{"role": "system", "content": system}] if system else []) + conv
        reference = render(messages=msgs, add_generation_prompt=False)
        turns = tpl.encode_turns(conv, system)
        assert "".join(tok.decode(p) + tok.decode(r) for p, r in turns) == reference
        assert tok.decode(tpl.encode_prompt(conv[:-1], system)) == render(messages=msgs[:-1], add_generation_prompt=True)
    assert tpl.stop_token_ids == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_seed_knowledge_mix_real(tok, cache):
    s = run(tok, cache, "dpo_en_demo,alpaca_en_demo", "dpo", kto_alpha=0.5, max_samples=3, cutoff_len=256)
    assert sum(1 for r in s.train if r.get("sft_only")) == 3 and len(s.train) == 6
    batch = get_collator("dpo", tok.pad_token_id)(s.train)
    assert batch["input_ids"].shape[0] == 6 and batch["sft_labels"].shape[0] == 3


@pytest.mark.parametrize("name,stage,template", [("alpaca_en_demo", "sft", "default"),
                                                 ("glaive_toolcall_en_demo", "sft", None),
                                                 ("dpo_en_demo", "dpo", "chatml"), ("kto_en_demo", "kto", None),
                                                 ("wiki_demo", "pt", None)])
def test_batched_tokenization_gives_the_rows_of_one_encode_per_text(tok, tmp_path, monkeypatch, name, stage,
                                                                    template):
    # llmtune.data.batched: the texts go through encode_batch, the rows equal the plain pass's (one encode
    # call per text, the tokenizer's own), every id and label
    import llmtune.data.dataset as ds
    from llmtune.data import batched as b

    batched_texts = []

    def counting(tokenizer):
        def batch(texts, add_special_tokens):
            batched_texts.extend(texts)
            return tokenizer.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return batch

    monkeypatch.setattr(b, "_batch_encoder", counting)
    batched = run(tok, str(tmp_path / "a"), name, stage, template, max_samples=40, overwrite_cache=True)
    monkeypatch.setattr(ds, "encode_in_batches", lambda fn, tpl, tk: fn(tpl, tk))
    plain = run(tok, str(tmp_path / "b"), name, stage, template, max_samples=40, overwrite_cache=True)
    assert batched.train == plain.train and len(plain.train) > 0
    assert batched_texts   # the texts did go through encode_batch


def test_batched_tokenizer_falls_back_to_encode_when_asked_for_another_text(tok, monkeypatch):
    from llmtune.data import batched

    monkeypatch.setattr(batched, "BATCH", 2)
    sizes = []

    def batch(texts, add_special_tokens):
        sizes.append(len(texts))
        return tok.backend.encode_batch(texts, add_special_tokens=add_special_tokens)

    texts = ["Hello world", "\n", "Assistant:", "ünïcode 漢字 <|im_end|>", "tail"]
    pre = batched._Prefetched(tok, texts, batch)
    asked = ["Hello world", "not recorded", "\n", "Assistant:", "ünïcode 漢字 <|im_end|>", "tail", "tail"]
    got = [pre.encode(t, add_special_tokens=False) for t in asked]
    assert got == [tok.backend.encode(t, add_special_tokens=False).ids for t in asked]
    assert sizes == [2, 2, 1]   # batches of BATCH recorded texts, in order; the others encoded one by one
