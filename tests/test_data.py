"""Data pipeline on small hand-made datasets: registry, loaders, formats, encoding per stage, cache, collators.

A character-level fake tokenizer (below) makes every expected token sequence writable by hand: each special
token is one id, every other character ``c`` is ``1000 + ord(c)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmtune.data import get_collator, get_dataset, get_template
from llmtune.data.encode import IGNORE_INDEX, cut_response, infer_seqlen
from llmtune.errors import LLMTuneError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|begin_of_text|>", "<|eom_id|>"]
CHATML_JINJA = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\nDEFAULT SYS<|im_end|>\n' }}{% endif %}"
                "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class FakeTokenizer:
    """Implements the Tokenizer API of docs/internals.md at character level."""

    def __init__(self, bos="<s>", eos="<|im_end|>", chat_template=CHATML_JINJA):
        self.special = {t: i for i, t in enumerate(SPECIALS)}
        self.inv = {i: t for t, i in self.special.items()}
        self.bos_token_id = self.special[bos] if bos else None
        self.eos_token_id = self.special[eos]
        self.pad_token_id = self.special["<|endoftext|>"]
        self.eos_token_ids = [self.eos_token_id]
        self.chat_template = chat_template
        self.vocab_size = 1000 + 0x110000
        self.name_or_path = "fake-char-tokenizer"

    def encode(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            for tok, tid in self.special.items():
                if text.startswith(tok, i):
                    ids.append(tid)
                    i += len(tok)
                    break
            else:
                ids.append(1000 + ord(text[i]))
                i += 1
        return ids

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.inv[i] if i in self.inv else chr(i - 1000) for i in ids
                       if not (skip_special_tokens and i in self.inv))

    def convert_tokens_to_ids(self, token):
        return self.special.get(token)

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=False, tokenize=False, **kw):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        text = ImmutableSandboxedEnvironment().from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return self.encode(text) if tokenize else text


def E(text):
    """Expected ids of ``text`` under the fake tokenizer, built independently of it."""
    ids, i = [], 0
    while i < len(text):
        hit = next((t for t in SPECIALS if text.startswith(t, i)), None)
        if hit:
            ids.append(SPECIALS.index(hit))
            i += len(hit)
        else:
            ids.append(1000 + ord(text[i]))
            i += 1
    return ids


IM_END = SPECIALS.index("<|im_end|>")


@pytest.fixture
def tok():
    return FakeTokenizer()


def write_dir(tmp_path: Path, info: dict, files: dict) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    (d / "dataset_info.json").write_text(json.dumps(info))
    for name, content in files.items():
        p = d / name
        p.write_text(content if isinstance(content, str) else json.dumps(content))
    return d


def args(d, dataset, tmp_path, **kw):
    base = {"dataset": dataset, "dataset_dir": str(d), "cutoff_len": 1024, "cache_dir": str(tmp_path / "cache")}
    base.update(kw)
    return base


SFT_ROWS = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Hi", "input": "", "output": "Hello"}]


# -- registry and files --------------------------------------------------------------------------
def test_seed_style_sft_registration(tmp_path, tok):
    d = write_dir(tmp_path, {"my_sft_data": {"file_name": "sft_data.json", "type": "sft", "columns": {
        "instruction": "instruction", "input": "input", "output": "output"}}}, {"sft_data.json": SFT_ROWS})
    tpl = get_template("chatml", tok)
    rows = get_dataset(args(d, "my_sft_data", tmp_path), tok, tpl, "sft").train
    prompt = E("<|im_start|>user\nAdd\n1 2<|im_end|>\n<|im_start|>assistant\n")
    answer = E("3<|im_end|>")
    assert rows[0]["input_ids"] == prompt + answer
    assert rows[0]["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert rows[0]["attention_mask"] == [1] * len(prompt + answer)


def test_seed_style_pretrain_registration(tmp_path, tok):
    docs = [{"text": "abc"}, {"text": "de"}]
    d = write_dir(tmp_path, {"my_pretrain_data": {"file_name": "pretrain_data.json", "columns": {"text": "text"},
                                                  "type": "pretrain"}}, {"pretrain_data.json": docs})
    tpl = get_template(None, tok)
    rows = get_dataset(args(d, "my_pretrain_data", tmp_path, cutoff_len=4), tok, tpl, "pretrain").train
    stream = E("abc") + [tok.eos_token_id] + E("de") + [tok.eos_token_id]
    assert [r["input_ids"] for r in rows] == [stream[0:4], stream[4:8]]
    assert all(r["labels"] == r["input_ids"] for r in rows)


def test_seed_style_dpo_and_ranked_rm(tmp_path, tok):
    d = write_dir(tmp_path, {
        "my_dpo_data": {"file_name": "dpo.json", "type": "dpo", "columns": {
            "instruction": "instruction", "input": "input", "chosen": "chosen", "rejected": "rejected"}},
        "my_rm_data": {"file_name": "rm.json", "columns": {"instruction": "instruction", "input": "input",
                                                          "output": "output"}}},
        {"dpo.json": [{"instruction": "Q", "input": "", "chosen": "good", "rejected": "bad"}],
         "rm.json": [{"instruction": "Q", "input": "", "output": ["A", "B", "C"]}]})
    tpl = get_template("chatml", tok)
    prompt = E("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    row = get_dataset(args(d, "my_dpo_data", tmp_path), tok, tpl, "dpo").train[0]
    assert row["chosen_input_ids"] == prompt + E("good<|im_end|>")
    assert row["rejected_input_ids"] == prompt + E("bad<|im_end|>")
    assert row["rejected_labels"] == [IGNORE_INDEX] * len(prompt) + E("bad<|im_end|>")
    rows = get_dataset(args(d, "my_rm_data", tmp_path), tok, tpl, "rm").train
    pairs = [(tok.decode(r["chosen_input_ids"][len(prompt):]), tok.decode(r["rejected_input_ids"][len(prompt):]))
             for r in rows]
    assert pairs == [("A<|im_end|>", "B<|im_end|>"), ("A<|im_end|>", "C<|im_end|>"), ("B<|im_end|>", "C<|im_end|>")]


def test_unknown_key_notice_and_type_mismatch(tmp_path, tok, capsys):
    d = write_dir(tmp_path, {"x": {"file_name": "x.json", "formating": "alpaca", "type": "pretrain"}},
                  {"x.json": SFT_ROWS})
    get_dataset(args(d, "x", tmp_path), tok, get_template("chatml", tok), "sft")
    err = capsys.readouterr().err
    assert "unknown key 'formating'" in err and "formatting" in err
    assert "type 'pretrain'" in err


def test_unknown_dataset_suggests(tmp_path, tok):
    d = write_dir(tmp_path, {"alpaca_en_demo": {"file_name": "a.json"}}, {"a.json": SFT_ROWS})
    with pytest.raises(LLMTuneError, match="Did you mean: alpaca_en_demo"):
        get_dataset(args(d, "alpaca_en_dem", tmp_path), tok, get_template("chatml", tok), "sft")


def test_missing_file_message(tmp_path, tok):
    d = write_dir(tmp_path, {"gone": {"file_name": "gone.json"}}, {})
    with pytest.raises(LLMTuneError) as err:
        get_dataset(args(d, "gone", tmp_path), tok, get_template("chatml", tok), "sft")
    msg = str(err.value)
    assert "'gone'" in msg and "gone.json" in msg and str(d) in msg and "dataset_dir" in msg


def test_malformed_json_names_file_and_line(tmp_path, tok):
    d = write_dir(tmp_path, {"bad": {"file_name": "bad.json"}, "badl": {"file_name": "bad.jsonl"}},
                  {"bad.json": '[\n{"instruction": "a", "output": "b"},\n{"instruction": oops}\n]',
                   "bad.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": \n'})
    with pytest.raises(LLMTuneError, match=r"bad\.json: invalid JSON at line 3"):
        get_dataset(args(d, "bad", tmp_path), tok, get_template("chatml", tok), "sft")
    with pytest.raises(LLMTuneError, match=r"bad\.jsonl: invalid JSON at line 2"):
        get_dataset(args(d, "badl", tmp_path), tok, get_template("chatml", tok), "sft")


def test_missing_column(tmp_path, tok):
    d = write_dir(tmp_path, {"x": {"file_name": "x.json", "columns": {"prompt": "question", "response": "answer"}}},
                  {"x.json": SFT_ROWS})
    with pytest.raises(LLMTuneError, match="column 'question'.*missing.*instruction"):
        get_dataset(args(d, "x", tmp_path), tok, get_template("chatml", tok), "sft")


def test_empty_and_no_answer_errors(tmp_path, tok):
    d = write_dir(tmp_path, {"e": {"file_name": "e.json"}, "p": {"file_name": "p.json"}},
                  {"e.json": [], "p.json": [{"instruction": "only a prompt"}]})
    with pytest.raises(LLMTuneError, match="'e': no rows"):
        get_dataset(args(d, "e", tmp_path), tok, get_template("chatml", tok), "sft")
    with pytest.raises(LLMTuneError, match="'p' has no answers"):
        get_dataset(args(d, "p", tmp_path), tok, get_template("chatml", tok), "sft")


def test_every_label_masked_error(tmp_path, tok):
    d = write_dir(tmp_path, {"x": {"file_name": "x.json"}},
                  {"x.json": [{"instruction": "a long prompt here", "output": "b"}]})
    with pytest.raises(LLMTuneError, match="'x': no example left to train on"):
        get_dataset(args(d, "x", tmp_path, cutoff_len=1), tok, get_template("chatml", tok), "sft")


def test_file_types_and_path_dataset(tmp_path, tok):
    d = write_dir(tmp_path, {"c": {"file_name": "c.csv"}, "t": {"file_name": "t.txt", "columns": {"prompt": "text"}},
                             "folder": {"file_name": "dir"}},
                  {"c.csv": "instruction,input,output\nAdd,1 2,3\n", "t.txt": "doc one\n\ndoc two\n"})
    (d / "dir").mkdir()
    (d / "dir" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in SFT_ROWS))
    tpl = get_template("chatml", tok)
    c = get_dataset(args(d, "c", tmp_path), tok, tpl, "sft").train
    assert tok.decode(c[0]["input_ids"]).startswith("<|im_start|>user\nAdd\n1 2<|im_end|>")
    t = get_dataset(args(d, "t", tmp_path), tok, tpl, "pt").train
    assert t[0]["input_ids"] == E("doc one") + [IM_END] + E("doc two") + [IM_END]
    assert len(get_dataset(args(d, "folder", tmp_path), tok, tpl, "sft").train) == 2
    share = tmp_path / "chat.json"
    share.write_text(json.dumps([{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]))
    rows = get_dataset(args(d, str(share), tmp_path), tok, tpl, "sft").train
    assert rows[0]["input_ids"] == E("<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\na<|im_end|>")


def test_pt_packing_false_keeps_one_row_per_document(tmp_path, tok):
    """LLaMA-Factory's packing: unset means packed blocks for pt; packing: false gives one row per document."""
    d = write_dir(tmp_path, {"t": {"file_name": "t.txt", "columns": {"prompt": "text"}}},
                  {"t.txt": "doc one\n\ndoc two\n"})
    tpl = get_template("chatml", tok)
    rows = get_dataset(args(d, "t", tmp_path, packing=False), tok, tpl, "pt").train
    assert [r["input_ids"] for r in rows] == [E("doc one") + [IM_END], E("doc two") + [IM_END]]
    assert [r["labels"] for r in rows] == [r["input_ids"] for r in rows]


def test_packing_without_neat_attends_across_examples(tmp_path, tok):
    rows = [{"instruction": "q" * n, "output": "a"} for n in (3, 5)]
    d = write_dir(tmp_path, {"x": {"file_name": "x.json"}}, {"x.json": rows})
    tpl = get_template("empty", tok)
    plain = get_dataset(args(d, "x", tmp_path), tok, tpl, "sft").train
    n = sum(len(r["input_ids"]) for r in plain)
    row = get_dataset(args(d, "x", tmp_path, packing=True, cutoff_len=n), tok, tpl, "sft").train[0]
    assert row["attention_mask"] == [1] * n and row["position_ids"] == list(range(n))
    assert row["labels"][len(plain[0]["input_ids"])] == IGNORE_INDEX


def test_parquet(tmp_path, tok):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    d = write_dir(tmp_path, {"pq": {"file_name": "x.parquet"}}, {})
    pq.write_table(pa.Table.from_pylist(SFT_ROWS), d / "x.parquet")
    rows = get_dataset(args(d, "pq", tmp_path), tok, get_template("chatml", tok), "sft").train
    assert len(rows) == 2


def test_hub_entries_offline_and_modelscope(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = write_dir(tmp_path, {"h": {"hf_hub_url": "nobody/not-a-dataset-xyz"}, "m": {"ms_hub_url": "a/b"}}, {})
    with pytest.raises(LLMTuneError, match="'h' is hosted on the Hugging Face Hub.*can't be reached"):
        get_dataset(args(d, "h", tmp_path), tok, get_template("chatml", tok), "sft")
    with pytest.raises(LLMTuneError, match="'m' is only on ModelScope"):
        get_dataset(args(d, "m", tmp_path), tok, get_template("chatml", tok), "sft")


def test_max_samples_val_size_and_concat(tmp_path, tok):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    d = write_dir(tmp_path, {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}},
                  {"a.json": rows, "b.json": SFT_ROWS})
    tpl = get_template("chatml", tok)
    s = get_dataset(args(d, "a,b", tmp_path, max_samples=6), tok, tpl, "sft")
    assert len(s.train) == 8 and s.eval is None
    s1 = get_dataset(args(d, "a", tmp_path, val_size=0.3, seed=1), tok, tpl, "sft")
    s2 = get_dataset(args(d, "a", tmp_path, val_size=0.3, seed=1), tok, tpl, "sft")
    assert len(s1.eval) == 3 and len(s1.train) == 7 and s1.eval == s2.eval
    key = lambda r: tuple(r["input_ids"])  # noqa: E731
    assert {key(r) for r in s1.train} | {key(r) for r in s1.eval} == {key(r) for r in s.train[:6]} | {
        key(r) for r in get_dataset(args(d, "a", tmp_path), tok, tpl, "sft").train}
    s3 = get_dataset(args(d, "a", tmp_path, eval_dataset="b"), tok, tpl, "sft")
    assert len(s3.train) == 10 and len(s3.eval) == 2


# -- encoding rules ----------------------------------------------------------------------------
def test_infer_seqlen_and_cut_response():
    assert infer_seqlen(10, 3, 20) == (10, 3)
    assert infer_seqlen(30, 3, 20) == (17, 3)  # short answer kept whole, prompt takes the rest
    assert infer_seqlen(4, 30, 20) == (4, 16)  # short prompt kept whole
    assert infer_seqlen(30, 30, 20) == (10, 10)  # both shrink in proportion
    assert cut_response([5, 6, 7, 8, 2, 9], 4, [2]) == [5, 6, 2, 9]
    assert cut_response([5, 6, 7, 8, 2], 3, [2]) == [5, 6, 2]


def test_truncation_keeps_end_of_turn_and_reports(tmp_path, tok, capsys):
    d = write_dir(tmp_path, {"x": {"file_name": "x.json"}},
                  {"x.json": [{"instruction": "q", "output": "x" * 100}, {"instruction": "q", "output": "y"}]})
    rows = get_dataset(args(d, "x", tmp_path, cutoff_len=40), tok, get_template("chatml", tok), "sft").train
    assert len(rows) == 2 and len(rows[0]["input_ids"]) == 40
    assert rows[0]["input_ids"][-1] == IM_END and rows[0]["labels"][-1] == IM_END
    assert "1 example(s) longer than cutoff_len=40" in capsys.readouterr().err


def test_multiturn_masking_train_on_prompt_mask_history(tmp_path, tok):
    conv = {"conversations": [{"from": "human", "value": "h1"}, {"from": "gpt", "value": "g1"},
                              {"from": "human", "value": "h2"}, {"from": "gpt", "value": "g2"}]}
    d = write_dir(tmp_path, {"s": {"file_name": "s.json", "formatting": "sharegpt"}}, {"s.json": [conv]})
    tpl = get_template("chatml", tok)
    p1, r1 = E("<|im_start|>user\nh1<|im_end|>\n<|im_start|>assistant\n"), E("g1<|im_end|>")
    p2, r2 = E("\n<|im_start|>user\nh2<|im_end|>\n<|im_start|>assistant\n"), E("g2<|im_end|>")
    m = lambda x: [IGNORE_INDEX] * len(x)  # noqa: E731
    row = get_dataset(args(d, "s", tmp_path), tok, tpl, "sft").train[0]
    assert row["input_ids"] == p1 + r1 + p2 + r2
    assert row["labels"] == m(p1) + r1 + m(p2) + r2
    row = get_dataset(args(d, "s", tmp_path, mask_history=True), tok, tpl, "sft").train[0]
    assert row["labels"] == m(p1) + m(r1) + m(p2) + r2
    row = get_dataset(args(d, "s", tmp_path, train_on_prompt=True), tok, tpl, "sft").train[0]
    assert row["labels"] == p1 + r1 + p2 + r2


def test_kto_pairs_prompt_with_next_completion(tmp_path, tok):
    rows = [{"instruction": f"q{i}", "output": f"a{i}", "label": i % 2 == 0} for i in range(3)]
    d = write_dir(tmp_path, {"k": {"file_name": "k.json", "columns": {"kto_tag": "label"}}}, {"k.json": rows})
    out = get_dataset(args(d, "k", tmp_path), tok, get_template("chatml", tok), "kto").train
    for i, r in enumerate(out):
        prompt = E(f"<|im_start|>user\nq{i}<|im_end|>\n<|im_start|>assistant\n")
        assert r["input_ids"] == prompt + E(f"a{i}<|im_end|>")
        assert r["kl_input_ids"] == prompt + E(f"a{(i + 1) % 3}<|im_end|>")
        assert r["kl_labels"] == [IGNORE_INDEX] * len(prompt) + E(f"a{(i + 1) % 3}<|im_end|>")
        assert r["kto_tag"] is (i % 2 == 0)


def test_dpo_with_kto_alpha_mixes_sft_only_rows(tmp_path, tok):
    d = write_dir(tmp_path, {"pref": {"file_name": "p.json", "ranking": True, "columns": {
        "prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}, "know": {"file_name": "k.json"}},
        {"p.json": [{"instruction": "Q", "chosen": "c", "rejected": "r"}], "k.json": SFT_ROWS})
    tpl = get_template("chatml", tok)
    rows = get_dataset(args(d, "pref,know", tmp_path, kto_alpha=0.5), tok, tpl, "dpo").train
    assert "chosen_input_ids" in rows[0] and [r.get("sft_only") for r in rows[1:]] == [True, True]
    batch = get_collator("dpo", 0)(rows)
    assert batch["input_ids"].shape[0] == 2 and batch["sft_input_ids"].shape[0] == 2
    with pytest.raises(LLMTuneError, match="kto_alpha"):
        get_dataset(args(d, "know", tmp_path), tok, tpl, "dpo")


def test_ppo_prompt_ends_with_assistant_header(tmp_path, tok):
    d = write_dir(tmp_path, {"x": {"file_name": "x.json"}}, {"x.json": SFT_ROWS})
    row = get_dataset(args(d, "x", tmp_path), tok, get_template("chatml", tok), "ppo").train[0]
    assert row["input_ids"] == E("<|im_start|>user\nAdd\n1 2<|im_end|>\n<|im_start|>assistant\n")


def test_packing_segments_and_positions(tmp_path, tok):
    rows = [{"instruction": "q" * n, "output": "a"} for n in (3, 5, 2)]
    d = write_dir(tmp_path, {"x": {"file_name": "x.json"}}, {"x.json": rows})
    tpl = get_template("empty", tok)  # user "{{content}}", assistant "{{content}}"; stop = eos
    plain = get_dataset(args(d, "x", tmp_path), tok, tpl, "sft").train
    lens = [len(r["input_ids"]) for r in plain]
    packed = get_dataset(args(d, "x", tmp_path, neat_packing=True, cutoff_len=sum(lens)), tok, tpl, "sft").train
    assert len(packed) == 1
    row = packed[0]
    assert row["attention_mask"] == sum(([k + 1] * n for k, n in enumerate(lens)), [])  # segments in data order
    assert row["input_ids"] == sum((r["input_ids"] for r in plain), [])
    starts = [i for i, s in enumerate(row["attention_mask"]) if i == 0 or s != row["attention_mask"][i - 1]]
    assert len(starts) == 3
    for a, b in zip(starts, starts[1:] + [len(row["input_ids"])]):
        assert row["position_ids"][a:b] == list(range(b - a))
        assert row["labels"][a] == IGNORE_INDEX
    batch = get_collator("sft", 0)([row])
    assert batch["position_ids"][0].tolist() == row["position_ids"]


def test_cache_reused_and_rebuilt(tmp_path, tok, monkeypatch):
    d = write_dir(tmp_path, {"x": {"file_name": "x.json"}}, {"x.json": SFT_ROWS})
    tpl = get_template("chatml", tok)
    first = get_dataset(args(d, "x", tmp_path), tok, tpl, "sft").train
    assert list((tmp_path / "cache").glob("x-*.json"))
    import llmtune.data.dataset as ds

    def boom(*a, **k):
        raise AssertionError("read the file despite a valid cache")

    monkeypatch.setattr(ds, "read_file", boom)
    assert get_dataset(args(d, "x", tmp_path), tok, tpl, "sft").train == first
    with pytest.raises(AssertionError):
        get_dataset(args(d, "x", tmp_path, overwrite_cache=True), tok, tpl, "sft")
    with pytest.raises(AssertionError):  # another cutoff_len is another key
        get_dataset(args(d, "x", tmp_path, cutoff_len=7), tok, tpl, "sft")
    monkeypatch.undo()
    (d / "x.json").write_text(json.dumps(SFT_ROWS[:1]))
    assert len(get_dataset(args(d, "x", tmp_path), tok, tpl, "sft").train) == 1


# -- collators ---------------------------------------------------------------------------------
def test_pairwise_collator_stacks_chosen_first():
    rows = [{"chosen_input_ids": [1, 2, 3], "chosen_attention_mask": [1, 1, 1], "chosen_labels": [-100, 2, 3],
             "rejected_input_ids": [1, 4], "rejected_attention_mask": [1, 1], "rejected_labels": [-100, 4]},
            {"chosen_input_ids": [5], "chosen_attention_mask": [1], "chosen_labels": [5],
             "rejected_input_ids": [6, 7], "rejected_attention_mask": [1, 1], "rejected_labels": [-100, 7]}]
    b = get_collator("rm", 9)(rows)
    assert b["input_ids"].tolist() == [[1, 2, 3], [5, 9, 9], [1, 4, 9], [6, 7, 9]]
    assert b["labels"].tolist() == [[-100, 2, 3], [5, -100, -100], [-100, 4, -100], [-100, 7, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]]


def test_left_pad_collator():
    b = get_collator("ppo", 0)([{"input_ids": [4, 5, 6], "attention_mask": [1, 1, 1]}, {"input_ids": [7]}])
    assert b["input_ids"].tolist() == [[4, 5, 6], [0, 0, 7]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_pad_id_never_changes_the_loss():
    from llmtune.models.config import ModelConfig
    from llmtune.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Transformer(cfg).eval()
    rows = [{"input_ids": [3, 4, 5, 6, 7], "attention_mask": [1] * 5, "labels": [-100, -100, 5, 6, 7]},
            {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": [-100, 9]}]

    def loss(pad):
        b = get_collator("sft", pad)(rows)
        with torch.no_grad():
            logits = model.lm_head(model(b["input_ids"], attention_mask=b["attention_mask"],
                                         position_ids=b["position_ids"])).float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), b["labels"][:, 1:].reshape(-1),
                                                 ignore_index=-100)

    assert torch.equal(loss(0), loss(63))


def test_default_system_and_tool_format_from_args(tmp_path, tok):
    d = write_dir(tmp_path, {"x": {"file_name": "x.json"}}, {"x.json": SFT_ROWS[:1]})
    row = get_dataset(args(d, "x", tmp_path, default_system="Be kind."), tok, get_template("chatml", tok), "sft").train[0]
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n")
    row = get_dataset(args(d, "x", tmp_path, default_system="Be kind."), tok, get_template(None, tok), "sft").train[0]
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n")
