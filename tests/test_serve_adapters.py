"""Per-request LoRA adapters: the per-row layer (``llmtune.peft.rows``) against a per-row loop of LoRA's formula,
and ``llmtune api`` serving two adapters and the base in one batch on the real model, driven by the real
``openai`` client; vLLM's load/unload endpoints with good and bad requests.

References: LoRA's ``h = W0 x + b + s B A x`` (Hu et al. 2021, eq. 3) computed row by row; ``llmtune chat`` (the
CLI in a subprocess, adapter merged) for each adapter alone; vLLM's documented endpoint fields.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from reliability_helpers import make_model_folder, run_subprocess  # noqa: E402
from serve_helpers import live_server  # noqa: E402

from llmtune.errors import LLMTuneError  # noqa: E402
from llmtune.peft import row_adapters  # noqa: E402
from llmtune.peft.layers import LoraLinear, ModulesToSave  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# the per-row layer
# ---------------------------------------------------------------------------------------------------
def _holder(layer: nn.Module, names) -> nn.Module:
    h = nn.Module()
    h.layer = layer
    h.lora_config = {n: {} for n in names}
    return h


def _lora_layer(seed=0, dora=()):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(16, 12, bias=True)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 4)       # outputs of order 1
    layer = LoraLinear(base)
    for name, r, alpha, rs in (("a", 2, 4.0, False), ("b", 5, 3.0, True), ("c", 3, 6.0, False)):
        layer.update_layer(name, r, alpha, use_rslora=rs, use_dora=name in dora)
        with torch.no_grad():
            layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=g) / 4)
            if name in dora:
                layer.lora_magnitude_vector[name].mul_(1.0 + 0.1 * torch.rand(12, generator=g))
    layer.active_adapters = []
    layer.eval()
    return layer, g


def _formula(layer: LoraLinear, x: torch.Tensor, name):
    """LoRA eq. 3 for one row: ``W0 x + b + s B A x`` (no adapter: ``W0 x + b``)."""
    w, b = layer.base_layer.weight, layer.base_layer.bias
    y = x @ w.T + b
    if name is not None:
        y = y + layer.scaling[name] * (x @ layer.lora_A[name].weight.T) @ layer.lora_B[name].weight.T
    return y


def test_mixed_rows_equal_a_per_row_loop_of_loras_formula():
    layer, g = _lora_layer()
    names = ["a", None, "b", "c", "a", "b"]
    x = torch.randn(6, 3, 16, generator=g)
    with torch.no_grad(), row_adapters(_holder(layer, "abc"), names):
        y = layer(x)
    ref = torch.stack([_formula(layer, x[i], n) for i, n in enumerate(names)])
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    # decode-shaped input (rows, in) and the same rows in another order
    x2 = torch.randn(4, 16, generator=g)
    with torch.no_grad(), row_adapters(_holder(layer, "abc"), ["c", "c", None, "a"]):
        y2 = layer(x2)
    ref2 = torch.stack([_formula(layer, x2[i], n) for i, n in enumerate(["c", "c", None, "a"])])
    torch.testing.assert_close(y2, ref2, rtol=1e-6, atol=1e-6)


def test_one_adapter_batch_is_the_single_adapter_path_bit_for_bit():
    layer, g = _lora_layer()
    x = torch.randn(5, 2, 16, generator=g)
    with torch.no_grad():
        layer.active_adapters = ["b"]
        alone = layer(x)
        layer.active_adapters = []
        with row_adapters(_holder(layer, "abc"), ["b"] * 5):
            rows = layer(x)
        with row_adapters(_holder(layer, "abc"), ["b"]):     # one name covers a packed row of any size
            packed = layer(x)
    assert torch.equal(rows, alone) and torch.equal(packed, alone)
    assert layer.active_adapters == []


def test_unnamed_rows_run_the_active_adapter_and_the_base_when_none_is():
    layer, g = _lora_layer()
    x = torch.randn(3, 16, generator=g)
    layer.active_adapters = ["c"]
    with torch.no_grad(), row_adapters(_holder(layer, "abc"), [None, "a", None]):
        y = layer(x)
    ref = torch.stack([_formula(layer, x[0], "c"), _formula(layer, x[1], "a"), _formula(layer, x[2], "c")])
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    layer.active_adapters = ["a", "c"]
    with pytest.raises(LLMTuneError, match="2 adapters are active"), row_adapters(_holder(layer, "abc"),
                                                                                   [None, "a", "b"]):
        layer(x)


def test_the_cache_follows_in_place_changes_of_an_adapter():
    layer, g = _lora_layer()
    x = torch.randn(2, 16, generator=g)
    names = ["a", "b"]
    with torch.no_grad(), row_adapters(_holder(layer, "abc"), names):
        layer(x)
        layer.lora_B["a"].weight.mul_(3.0)
        y = layer(x)
    ref = torch.stack([_formula(layer, x[i], n) for i, n in enumerate(names)])
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)


def test_dora_and_modules_to_save_rows_equal_each_adapter_alone():
    layer, g = _lora_layer(seed=3, dora=("b",))
    x = torch.randn(4, 16, generator=g)
    names = ["b", "a", None, "b"]
    with torch.no_grad():
        with row_adapters(_holder(layer, "abc"), names):
            y = layer(x)
        alone = []
        for i, n in enumerate(names):
            layer.active_adapters = [] if n is None else [n]
            alone.append(layer(x[i:i + 1])[0])
        layer.active_adapters = []
    torch.testing.assert_close(y, torch.stack(alone), rtol=1e-6, atol=1e-6)
    emb = nn.Embedding(10, 4)
    wrap = ModulesToSave(emb, "a")
    wrap.add("b")
    with torch.no_grad():
        wrap.modules_to_save["a"].weight.add_(1.0)
        wrap.modules_to_save["b"].weight.add_(2.0)
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    with torch.no_grad(), row_adapters(_holder(wrap, "ab"), ["b", None, "a"]):
        out = wrap(ids)
    # None runs the active copy ("b", the last added), as the wrapper does outside the context
    ref = torch.stack([emb.weight[ids[0]] + 2, emb.weight[ids[1]] + 2, emb.weight[ids[2]] + 1])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_bad_row_names_are_one_clear_error():
    layer, g = _lora_layer()
    with pytest.raises(LLMTuneError, match="no adapter named 'zz'; the model has: a, b, c"):
        with row_adapters(_holder(layer, "abc"), ["a", "zz"]):
            pass
    with pytest.raises(LLMTuneError, match="dim 0 must be the rows"), torch.no_grad():
        with row_adapters(_holder(layer, "abc"), ["a", "b"]):
            layer(torch.randn(3, 16))


def test_engine_mixed_batch_equals_each_adapter_alone_on_a_tiny_model(tmp_path):
    from llmtune.engine import Engine, Request
    from llmtune.peft import apply_lora, load_adapter, save_adapter, set_adapter
    from llmtune.runs import load_model

    d = make_model_folder(tmp_path / "tiny")
    model = load_model(str(d))
    # different ranks and target modules; "b" is DoRA. (Larger B makes even a one-adapter batch differ from a
    # lone row by float rounding of order 1e-5 in the log-probs: batched products round differently.)
    for i, (name, r, tgt, dora) in enumerate((("a", 4, "all", False), ("b", 2, "v_proj,down_proj", True))):
        apply_lora(model, lora_rank=r, lora_target=tgt, adapter_name=name, use_dora=dora, upcast=False)
        g = torch.Generator().manual_seed(i)
        for mod in model.modules():
            if isinstance(mod, LoraLinear) and name in mod.lora_B:
                with torch.no_grad():
                    mod.lora_B[name].weight.normal_(0, 0.3, generator=g)
        save_adapter(model, tmp_path / name, str(d), adapter_name=name)
    model = load_model(str(d))
    for name in "ab":
        load_adapter(model, str(tmp_path / name), adapter_name=name)
    set_adapter(model, [])
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [6, 7]]
    names = ["a", None, "b", "a"]

    def run(pairs):
        return Engine(model, max_slots=4, max_len=40).run([Request(p, 12, adapter=n, logprobs=True)
                                                           for p, n in pairs])

    mixed = run(list(zip(prompts, names)))
    alone = [run([(p, n)])[0] for p, n in zip(prompts, names)]
    assert [c.tokens for c in mixed] == [c.tokens for c in alone]
    for c, ref in zip(mixed, alone):
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(ref.logprobs), rtol=0, atol=1e-5)
    tops = Engine(model, max_slots=4, max_len=40).run([Request(prompts[0], 1, adapter=n, top_logprobs=5)
                                                       for n in ("a", None, "b")])
    assert len({tuple(round(v, 3) for _, v in c.top_logprobs[0]) for c in tops}) == 3  # each adapter matters


# ---------------------------------------------------------------------------------------------------
# llmtune api on the real model
# ---------------------------------------------------------------------------------------------------
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

Q = "Name a fruit and a colour."


def _msgs(q=Q):
    return [{"role": "user", "content": q}]


def _make_adapter(model, base: str, out: Path, name: str, rank: int, target: str, seed: int, std: float):
    """A PEFT-layout adapter with random nonzero B (A is LoRA's Kaiming init)."""
    from llmtune.peft import apply_lora, delete_adapter, save_adapter

    torch.manual_seed(seed)
    apply_lora(model, lora_rank=rank, lora_target=target, adapter_name=name, upcast=False)
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, LoraLinear) and name in mod.lora_B:
            with torch.no_grad():
                mod.lora_B[name].weight.normal_(0, std, generator=g)
    save_adapter(model, out, base, adapter_name=name)
    delete_adapter(model, name)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from shared_inputs import real_model

    from llmtune.runs import load_model

    m = str(real_model())
    tmp = tmp_path_factory.mktemp("adapters")
    model = load_model(m)
    a = _make_adapter(model, m, tmp / "ad_a", "a", 8, "all", 1, 0.05)
    b = _make_adapter(model, m, tmp / "ad_b", "b", 4, "q_proj,v_proj,o_proj", 2, 0.1)
    del model
    argv = ["--model_name_or_path", m, "--adapter_name_or_path", f"alpha={a},{b}", "--served_model_name", "base",
            "--max_model_len", "512", "--max_num_seqs", "4"]
    with live_server(argv, timeout=240) as (url, state):
        yield url, state, m, a, b, tmp


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _chat_cli(m: str, adapter, max_new: int) -> str:
    args = ["chat", "--model_name_or_path", m, "--do_sample", "false", "--max_new_tokens", str(max_new)]
    if adapter is not None:
        args += ["--adapter_name_or_path", str(adapter)]
    proc = run_subprocess(args, stdin=(Q + "\n").encode(), timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return proc.stdout.decode().strip().splitlines()[-1][len("Assistant: "):].removesuffix(" [...]")


@pytest.mark.real
def test_two_adapters_and_the_base_in_one_batch_equal_llmtune_chat_alone(served):
    url, state, m, a, b, _ = served
    ids = [x.id for x in _client(url).models.list()]
    assert ids == ["base", "alpha", str(b)]
    engine = state.scheduler.engine
    seen: list = []
    step = engine.step

    def recording_step():
        seen.append({r.req.adapter for r in engine.rows})
        return step()

    engine.step = recording_step
    out: dict = {}
    barrier = threading.Barrier(3)

    def ask(model):
        barrier.wait()
        r = _client(url).chat.completions.create(model=model, messages=_msgs(), max_tokens=24, temperature=0)
        out[model] = r.choices[0].message.content

    try:
        threads = [threading.Thread(target=ask, args=(n,)) for n in ("alpha", str(b), "base")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        engine.step = step
    assert max(len(s) for s in seen) == 3, seen       # some decode steps held all three rows
    expected = {"alpha": _chat_cli(m, a, 24), str(b): _chat_cli(m, b, 24), "base": _chat_cli(m, None, 24)}
    assert out == expected
    assert len(set(expected.values())) == 3             # each adapter changes the reply


@pytest.mark.real
def test_load_and_unload_lora_adapter_while_serving(served):
    url, state, m, a, b, tmp = served
    c = _client(url)
    alpha = c.chat.completions.create(model="alpha", messages=_msgs(), max_tokens=8, temperature=0)
    copy = tmp / "copy_of_a"
    shutil.copytree(a, copy)
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(copy)}, timeout=60)
    assert r.status_code == 200 and "gamma" in r.text
    assert [x.id for x in c.models.list()][-1] == "gamma"
    card = httpx.get(url + "/v1/models/gamma").json()
    assert card["parent"] == "base" and card["root"] == str(copy.resolve())
    gamma = c.chat.completions.create(model="gamma", messages=_msgs(), max_tokens=8, temperature=0)
    assert gamma.choices[0].message.content == alpha.choices[0].message.content
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "gamma"}, timeout=60)
    assert r.status_code == 200
    assert "gamma" not in [x.id for x in c.models.list()]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gamma", messages=_msgs(), max_tokens=4, temperature=0)
    # the same name can be loaded again after its unload
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(copy)}, timeout=60)
    assert r.status_code == 200
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "gamma"}, timeout=60).status_code == 200


@pytest.mark.real
def test_an_adapter_in_use_is_not_unloaded(served):
    url, state, *_ = served
    body = {"model": "alpha", "messages": _msgs(), "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as s:
        lines = s.iter_lines()
        next(ln for ln in lines if ln.startswith("data: "))          # the request runs
        r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "alpha"}, timeout=60)
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
        assert "in use by 1 running or queued request" in r.json()["error"]["message"]
    deadline = time.monotonic() + 30                                   # the client left: its slot frees
    while state.scheduler.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "alpha" in [x.id for x in _client(url).models.list()]


def _other_base_adapter(tmp: Path) -> Path:
    from llmtune.runs import load_model

    d = make_model_folder(tmp / "other_base")
    return _make_adapter(load_model(str(d)), str(d), tmp / "other_adapter", "o", 2, "q_proj", 0, 0.1)


@pytest.mark.real
def test_bad_load_and_unload_requests_get_openai_shaped_errors(served):
    url, state, m, a, b, tmp = served
    other = _other_base_adapter(tmp)
    no_weights = tmp / "no_weights"
    no_weights.mkdir(exist_ok=True)
    (no_weights / "adapter_config.json").write_text((Path(a) / "adapter_config.json").read_text())
    load, unload = url + "/v1/load_lora_adapter", url + "/v1/unload_lora_adapter"
    cases = [
        (load, {"lora_name": "alpha", "lora_path": str(a)}, 400, "already served"),
        (load, {"lora_name": "base", "lora_path": str(a)}, 400, "(the base model)"),
        (load, {"lora_name": "x", "lora_path": str(tmp / "absent")}, 400, "does not exist"),
        (load, {"lora_name": "x", "lora_path": str(Path(m).parent)}, 400, "is not an adapter folder"),
        (load, {"lora_name": "x", "lora_path": str(no_weights)}, 400, "missing adapter_model.safetensors"),
        (load, {"lora_name": "x", "lora_path": str(other)}, 400, "was trained on the base model"),
        (load, {"lora_name": "x"}, 400, "'lora_path' is required"),
        (load, {"lora_path": str(a)}, 400, "'lora_name' is required"),
        (load, {"lora_name": 3, "lora_path": str(a)}, 400, "'lora_name' is required"),
        (load, [1, 2], 400, "must be a JSON object"),
        (unload, {"lora_name": "nope"}, 404, "no LoRA adapter named 'nope'"),
        (unload, {"lora_name": "base"}, 400, "is the base model"),
        (unload, {}, 400, "'lora_name' is required"),
    ]
    for endpoint, body, status, text in cases:
        r = httpx.post(endpoint, json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert text in err["message"] and set(err) >= {"message", "type", "param", "code"}, (body, err)
    r = httpx.post(load, content=b"{not json", headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    # nothing of the refused loads stayed in the model
    from llmtune.peft import list_adapters

    assert list_adapters(state.scheduler.engine.model) == ["alpha", str(b)]
    assert [x.id for x in _client(url).models.list()] == ["base", "alpha", str(b)]


def test_adapter_specs_parse_names_and_refuse_duplicates():
    from llmtune.serve.adapters import parse_adapter_specs

    assert parse_adapter_specs("x=/p/a, /p/b") == [("x", "/p/a"), ("/p/b", "/p/b")]
    assert parse_adapter_specs(None) == []
    with pytest.raises(LLMTuneError, match="given twice"):
        parse_adapter_specs("x=/a,x=/b")
    with pytest.raises(LLMTuneError, match="needs both a name and a path"):
        parse_adapter_specs("=/a")
