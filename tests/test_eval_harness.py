"""`llmtune eval` and llmtune's lm-evaluation-harness ``LM`` give the harness's own ``hf`` model's numbers.

Reference: ``lm_eval.models.huggingface.HFLM`` (transformers) on the same checkpoint: a Hugging Face folder written
from transformers' own float32 import of the real GGUF model. Three local tasks (tests/fixtures/eval_tasks: a
multiple-choice log-likelihood task, a greedy generate_until task, a rolling log-likelihood task) run through
``lm_eval.simple_evaluate`` with both models; per-request log-likelihoods agree within 1e-4 (float32), greedy
flags, generations and metrics are equal. A LoRA adapter evaluated by the command line matches HFLM with
``peft=`` the same folder. Without lm-eval installed the harness tests skip; the argument tests run anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtune.errors import LLMTuneError
from llmtune.eval.run import parse_eval_args

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "fixtures" / "eval_tasks"


def _need_lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'llmtune[eval]')")


# -- arguments (no model) ----------------------------------------------------------------------------------

def test_llamafactory_eval_keys_map(tmp_path, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("model_name_or_path: m\ntask: mmlu_test\nn_shot: 5\nsave_dir: out\nlang: en\nbatch_size: 4\n")
    args = parse_eval_args([str(cfg)])
    assert args["tasks"] == ["mmlu"] and args["num_fewshot"] == 5 and args["output_path"] == "out"
    assert args["batch_size"] == 4
    err = capsys.readouterr().err
    assert "'lang' has no effect" in err and "mmlu" in err
    args = parse_eval_args(["--tasks", "a,b", "--model_name_or_path", "m", "--limit", "0.5"])
    assert args["tasks"] == ["a", "b"] and args["limit"] == 0.5
    assert parse_eval_args(["--tasks", "a", "--model_name_or_path", "m", "--limit", "3"])["limit"] == 3


@pytest.mark.parametrize("argv, words", [
    (["--tasks", "a", "--model_name_or_path", "m", "--num_fewshots", "2"], ["unknown key --num_fewshots",
                                                                           "num_fewshot"]),
    (["--model_name_or_path", "m"], ["--tasks"]),
    (["--tasks", "a"], ["--model_name_or_path"]),
    (["--tasks", "a", "--model_name_or_path", "m", "--batch_size", "0"], ["--batch_size"]),
    (["--tasks", "a", "--model_name_or_path", "m", "--batch_size", "x"], ["--batch_size", "integer"]),
    (["--tasks", "a", "--model_name_or_path", "m", "--include_path", "/nonexistent/dir"], ["--include_path"]),
    (["--tasks", "a", "--model_name_or_path", "m", "--adapter_name_or_path", "x", "--finetuning_type", "full"],
     ["finetuning_type"]),
])
def test_bad_arguments_are_one_clear_error(argv, words):
    with pytest.raises(LLMTuneError) as e:
        parse_eval_args(argv)
    for w in words:
        assert w in str(e.value)


def test_missing_lm_eval_names_the_extra(monkeypatch):
    from llmtune.eval import lm

    monkeypatch.setitem(sys.modules, "lm_eval", None)   # import lm_eval -> ImportError
    with pytest.raises(LLMTuneError, match=r"pip install 'llmtune\[eval\]'"):
        lm.import_lm_eval()


def test_scores_match_one_request_at_a_time():
    """Packed, batched scoring equals a plain per-request forward's log-softmax (a tiny random model)."""
    from tiny_helpers import tiny_model

    from llmtune.eval.lm import score_continuations

    model = tiny_model().eval()
    g = torch.Generator().manual_seed(1)
    reqs = [(torch.randint(1, 61, (n,), generator=g).tolist(), torch.randint(1, 61, (m,), generator=g).tolist())
            for n, m in [(5, 1), (9, 3), (2, 2), (12, 1), (7, 4)]]
    got = score_continuations(model, reqs, max_length=10, batch_size=3)
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        inp = (ctx + cont)[-11:][:-1]          # HFLM's left truncation to max_length + 1, last token dropped
        with torch.no_grad():
            logits = model.lm_head(model(torch.tensor([inp])))[0].double()
        lsm = torch.log_softmax(logits[-len(cont):], -1)
        want = float(lsm[torch.arange(len(cont)), torch.tensor(cont)].sum())
        assert abs(lp - want) < 1e-5
        assert greedy == bool((logits[-len(cont):].argmax(-1) == torch.tensor(cont)).all())


def test_generation_settings_follow_the_harness_rule(capsys):
    """No do_sample: sampling iff temperature > 0 (lm_eval.models.utils.normalize_gen_kwargs); do_sample with
    temperature 0 is greedy; other keys get one notice."""
    from llmtune.eval.lm import _sampling_from

    warned: set = set()
    assert not _sampling_from({"temperature": 0.0}, warned).do_sample
    p = _sampling_from({"temperature": 0.7, "top_p": 0.9, "top_k": 5}, warned)
    assert p.do_sample and (p.temperature, p.top_p, p.top_k) == (0.7, 0.9, 5)
    assert not _sampling_from({"do_sample": False, "temperature": 0.7}, warned).do_sample
    assert not _sampling_from({"do_sample": True, "temperature": 0.0}, warned).do_sample
    _sampling_from({"num_beams": 4}, warned)
    _sampling_from({"num_beams": 4}, warned)
    assert capsys.readouterr().err.count("num_beams") == 1


def test_generation_stops_at_the_stop_strings():
    """generate_texts cuts at the first stop string and stops the row; the text before it is the greedy text."""
    from tiny_helpers import tiny_model

    from llmtune.eval.lm import generate_texts

    class Tok:   # one character per token id: the text shows exactly which tokens were generated
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(65 + int(i) % 26) for i in ids)

    model = tiny_model().eval()
    prompt = [3, 9, 27, 4]
    full = list(prompt)
    with torch.no_grad():                  # the reference: greedy by whole forwards, no cache, no engine
        for _ in range(12):
            full.append(int(model.lm_head(model(torch.tensor([full])))[0, -1].argmax()))
    full = full[len(prompt):]
    text = Tok().decode(full)
    stop = text[5:7]                       # a stop string that first appears at character text.index(stop)
    got = generate_texts(model, Tok(), [prompt, prompt[:2]], [stop], max_gen_toks=12, batch_size=2)
    assert got[0] == text[:text.index(stop)]
    assert generate_texts(model, Tok(), [prompt], [], max_gen_toks=12)[0] == text


# -- against the harness's own hf model on the real checkpoint ----------------------------------------------

@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A copy of the fixture tasks whose ``data_files`` are absolute (the harness reads them from the folder it
    runs in; the fixture YAMLs name them from the repository root)."""
    folder = tmp_path_factory.mktemp("eval_tasks")
    for f in TASKS.iterdir():
        text = f.read_text()
        if f.suffix == ".yaml":
            text = text.replace("tests/fixtures/eval_tasks/", f"{folder}/")
        (folder / f.name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, hf_real_model_copy, hf_real_tokenizer):
    """The real model as a Hugging Face folder (transformers' float32 GGUF import, saved by transformers)."""
    _need_lm_eval()
    folder = tmp_path_factory.mktemp("eval") / "smollm2-hf"
    from safetensors.torch import save_file

    model = hf_real_model_copy()
    folder.mkdir()
    # by hand: transformers refuses save_pretrained of a GGUF import (it counts as "quantized with gguf")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(str(folder))
    tied = config.get("tie_word_embeddings", False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_real_tokenizer.save_pretrained(str(folder))
    del model
    return folder


def _evaluate(lm, task_dir, tasks, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=True, **kw)


def _by_doc(results, task):
    return {s["doc_id"]: s for s in results["samples"][task]}


def _assert_same(ours, theirs, tasks):
    for task in tasks:
        a, b = _by_doc(ours, task), _by_doc(theirs, task)
        assert sorted(a) == sorted(b) and a
        for doc in a:
            ra, rb = a[doc]["resps"], b[doc]["resps"]
            assert len(ra) == len(rb)
            for x, y in zip(ra, rb):
                x, y = x[0], y[0]
                if isinstance(x, str):                         # generate_until: the same text
                    assert x == y, (task, doc)
                elif isinstance(x, (list, tuple)):             # loglikelihood: (logprob, is_greedy)
                    assert abs(float(x[0]) - float(y[0])) < 1e-4, (task, doc, x, y)
                    assert bool(x[1]) == bool(y[1]), (task, doc)
                else:                                          # loglikelihood_rolling: a float
                    assert abs(float(x) - float(y)) < 1e-4, (task, doc, x, y)
        for metric, value in theirs["results"][task].items():
            if metric == "alias" or "stderr" in metric:
                continue
            assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, metric)


@pytest.mark.real
def test_llmtune_lm_matches_hflm(hf_folder, task_dir):
    _need_lm_eval()
    import transformers
    from lm_eval.models.huggingface import HFLM

    from llmtune.eval.lm import lm_class
    from llmtune.runs import load_model
    from llmtune.tokenizer import load_tokenizer

    model = load_model(str(hf_folder), dtype="float32")
    tok = load_tokenizer(str(hf_folder))
    ours_lm = lm_class()(model, tok, batch_size=3)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    theirs_lm = HFLM(pretrained=hf_model, tokenizer=hf_tok, device="cpu", batch_size=1)
    assert ours_lm.max_length == theirs_lm.max_length

    tasks = ["llmtune_mc", "llmtune_gen"]
    ours, theirs = _evaluate(ours_lm, task_dir, tasks), _evaluate(theirs_lm, task_dir, tasks)
    _assert_same(ours, theirs, tasks)
    gens = [s["resps"][0][0] for s in ours["samples"]["llmtune_gen"]]
    # real answers, cut at the stop string
    assert sum(bool(g.strip()) for g in gens) >= 5 and not any("\n" in g for g in gens), gens

    # few-shot contexts (longer, shared prefixes) and rolling windows: a context of 32 tokens, so every paragraph
    # of llmtune_ppl spans several windows
    ours_lm = lm_class()(model, tok, batch_size=4, max_length=32)
    theirs_lm = HFLM(pretrained=hf_model, tokenizer=hf_tok, device="cpu", batch_size=2, max_length=32)
    assert len(tok.encode(json.loads((TASKS / "llmtune_ppl.jsonl").read_text().splitlines()[0])["text"])) > 32
    ours = _evaluate(ours_lm, task_dir, ["llmtune_ppl", "llmtune_mc"], num_fewshot=2)
    theirs = _evaluate(theirs_lm, task_dir, ["llmtune_ppl", "llmtune_mc"], num_fewshot=2)
    _assert_same(ours, theirs, ["llmtune_ppl", "llmtune_mc"])


@pytest.mark.real
def test_cli_adapter_matches_hflm_with_peft(hf_folder, task_dir, tmp_path):
    _need_lm_eval()
    peft = pytest.importorskip("peft")
    import transformers
    from lm_eval.models.huggingface import HFLM

    from llmtune.eval.lm import lm_class

    base = transformers.AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32).eval()
    plain = _evaluate(HFLM(pretrained=base, tokenizer=transformers.AutoTokenizer.from_pretrained(str(hf_folder)),
                           device="cpu", batch_size=1), task_dir, ["llmtune_mc"], limit=2)   # the base alone
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False)           # random A and B: the adapter changes the numbers
    torch.manual_seed(0)
    pm = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)
    adapter = tmp_path / "adapter"
    pm.save_pretrained(str(adapter))
    del pm, base

    out = tmp_path / "res"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "llmtune", "eval", "--tasks", "llmtune_mc", "--include_path", str(task_dir),
         "--model_name_or_path", str(hf_folder), "--adapter_name_or_path", str(adapter),
         "--infer_dtype", "float32", "--device", "cpu", "--batch_size", "4", "--output_path", str(out),
         "--log_samples", "true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llmtune_mc" in proc.stdout and "acc" in proc.stdout     # the harness's table
    ours = json.loads((out / "results.json").read_text())
    assert ours["llmtune"]["adapters"] == [str(adapter.resolve())]

    theirs_lm = HFLM(pretrained=str(hf_folder), peft=str(adapter), device="cpu", dtype="float32", batch_size=1)
    theirs = _evaluate(theirs_lm, task_dir, ["llmtune_mc"])
    _assert_same(ours, theirs, ["llmtune_mc"])
    a, b = _by_doc(ours, "llmtune_mc")[0]["resps"][0][0], _by_doc(plain, "llmtune_mc")[0]["resps"][0][0]
    assert abs(float(a[0]) - float(b[0])) > 1e-3            # the adapter really was applied

    # the adapter folder given as the model (as an output / checkpoint-N folder is: its recorded base is loaded
    # and the adapter merged), and a merged export of it, give the same numbers
    from llmtune.eval.run import load_eval_model, parse_eval_args
    from llmtune.export import export

    merged = tmp_path / "merged"
    export({"model_name_or_path": str(hf_folder), "adapter_name_or_path": str(adapter), "export_dir": str(merged),
            "infer_dtype": "float32"})
    for source in (adapter, merged):
        args = parse_eval_args(["--tasks", "llmtune_mc", "--model_name_or_path", str(source),
                                "--infer_dtype", "float32", "--device", "cpu"])
        model, tok, _ = load_eval_model(args)
        res = _evaluate(lm_class()(model, tok, batch_size=4), task_dir, ["llmtune_mc"], limit=3)
        for doc, sample in _by_doc(res, "llmtune_mc").items():
            for x, y in zip(sample["resps"], _by_doc(ours, "llmtune_mc")[doc]["resps"]):
                assert abs(float(x[0][0]) - float(y[0][0])) < 1e-4, (source.name, doc)


@pytest.mark.real
def test_chat_prompts_match_hflm(real_model_path, hf_real_tokenizer):
    """--apply_chat_template renders the harness's chats as HFLM does with the same chat template."""
    _need_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from tiny_helpers import tiny_model

    from llmtune.eval.lm import lm_class
    from llmtune.tokenizer import load_tokenizer

    ours = lm_class()(tiny_model().eval(), load_tokenizer(str(real_model_path)))
    theirs = HFLM.__new__(HFLM)              # only its chat rendering: no model needed
    theirs.tokenizer, theirs.chat_template_args = hf_real_tokenizer, {}
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Question: 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "Question: 3+3?"}]
    assert ours.apply_chat_template(chat) == theirs.apply_chat_template(chat)
    prefill = chat + [{"role": "assistant", "content": "Answer:"}]
    assert ours.apply_chat_template(prefill, add_generation_prompt=False) == \
        theirs.apply_chat_template(prefill, add_generation_prompt=False)


@pytest.mark.real
def test_run_eval_on_a_tiny_model(real_model_path, task_dir, tmp_path, capsys):
    """The whole command on a random 2-layer model with the real vocabulary: chat prompts with an llmtune
    template, the JSON file, and a task whose data file is missing (one error line naming it)."""
    _need_lm_eval()
    from tiny_helpers import real_tokenizer_folder

    from llmtune.eval.run import run_eval

    folder = real_tokenizer_folder(real_model_path, tmp_path / "tiny")
    out = tmp_path / "r" / "scores.json"
    res = run_eval(parse_eval_args(["--tasks", "llmtune_gen,llmtune_mc", "--include_path", str(task_dir),
                                    "--model_name_or_path", str(folder), "--template", "chatml", "--limit", "2",
                                    "--max_gen_toks", "4", "--output_path", str(out), "--infer_dtype", "float32",
                                    "--log_samples", "true"]))
    saved = json.loads(out.read_text())
    assert saved["llmtune"]["template"] == "chatml" and set(saved["results"]) == {"llmtune_gen", "llmtune_mc"}
    assert res["results"]["llmtune_mc"]["acc,none"] == saved["results"]["llmtune_mc"]["acc,none"]
    prompt = json.dumps(saved["samples"]["llmtune_gen"][0]["arguments"])
    assert "<|im_start|>user" in prompt and "<|im_start|>assistant" in prompt     # rendered as a chatml chat
    assert "llmtune_mc" in capsys.readouterr().out
    run_eval(parse_eval_args(["--tasks", "llmtune_mc", "--include_path", str(task_dir), "--limit", "1",
                              "--model_name_or_path", str(folder), "--output_path", str(out)]))
    assert "replacing the results of an earlier llmtune eval" in capsys.readouterr().err
    assert set(json.loads(out.read_text())["results"]) == {"llmtune_mc"}

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "llmtune_missing.yaml").write_text(
        (task_dir / "llmtune_mc.yaml").read_text().replace("task: llmtune_mc", "task: llmtune_missing")
        .replace(f"{task_dir}/llmtune_mc.jsonl", str(tmp_path / "no-such-file.jsonl")))
    with pytest.raises(LLMTuneError, match="no-such-file.jsonl"):
        run_eval(parse_eval_args(["--tasks", "llmtune_missing", "--include_path", str(broken),
                                  "--model_name_or_path", str(folder)]))


def test_output_path_never_replaces_a_foreign_file(task_dir, tmp_path):
    _need_lm_eval()
    from llmtune.eval.run import run_eval

    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "llama"}')
    with pytest.raises(LLMTuneError, match="was not written by llmtune eval"):
        run_eval(parse_eval_args(["--tasks", "llmtune_mc", "--include_path", str(task_dir),
                                  "--model_name_or_path", str(tmp_path / "no-model"), "--output_path", str(cfg)]))
    assert cfg.read_text() == '{"model_type": "llama"}'
