"""Images in ``llmtune chat`` (``--images``, ``/image PATH``) and in ``llmtune api`` (OpenAI ``image_url`` parts) on a
tiny random-init Qwen2.5-VL (``test_vl_sft``'s) and generated images.

The reference is independent of the chat and serving code and of the generation engine: the prompt is written
by hand (the ``qwen2_vl`` template with ``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>``, n
counted by hand from each image's size), the pixels are the image processor's (checked against transformers'
in ``test_vl_images``), and greedy decoding is a loop of full forwards (no cache). The random model ends every
reply at once with ``<|im_end|>``, so the tests take the stop ids away and compare ``max_new_tokens`` tokens.
"""

import base64
import io
import json
import re

import pytest
import torch

pytest.importorskip("PIL.Image")

from test_vl_sft import _images, _model, _tokenizer, _vl_folder  # noqa: E402

import llmtune.chat as chat_mod  # noqa: E402
from llmtune.chat import ChatSession, run_chat  # noqa: E402
from llmtune.chat_images import ChatImages, pop_images_flag  # noqa: E402
from llmtune.data.images import QwenVLImageProcessor  # noqa: E402
from llmtune.data.templates import get_template  # noqa: E402
from llmtune.errors import LLMTuneError  # noqa: E402

N_NEW = 6
#: image tokens of _images' pictures (w x h: 40 x 24, 24 x 48, 32 x 32; patch 4, merge 2: sides are already
#: multiples of 8 inside [16, 64 * 64] pixels, so no resize): (h/4) * (w/4) / 4
TOKENS = [6 * 10 // 4, 12 * 6 // 4, 8 * 8 // 4]


def _proc():
    return QwenVLImageProcessor(min_pixels=16, max_pixels=64 * 64, patch_size=4)


def _vision(k: int) -> str:
    return "<|vision_start|>" + "<|image_pad|>" * TOKENS[k] + "<|vision_end|>"


def _greedy(model, tok, messages, images, n=N_NEW):
    """Reference: the hand-written prompt, the processor's pixels, ``n`` greedy tokens by full forwards."""
    ids = list(get_template("qwen2_vl", tok).encode_prompt(messages, system=None))
    vision = _proc()(images) if images else {}
    out = []
    with torch.no_grad():
        for _ in range(n):
            h = model(torch.tensor([ids + out]), **vision)
            out.append(int(model.lm_head(h[0, -1]).argmax()))
    return out


@pytest.fixture()
def spy(monkeypatch):
    """The tokens ``llmtune.chat`` generates (each reply's list), and no stop ids (see the module docstring)."""
    replies = []
    real = chat_mod.reply_events

    def events(*a, **k):
        replies.append([])
        for e in real(*a, **k):
            replies[-1].append(e.token)
            yield e

    monkeypatch.setattr(chat_mod, "reply_events", events)
    monkeypatch.setattr(chat_mod, "chat_stop_ids", lambda *a, **k: [])
    return replies


def _session(tok, model, vision=True):
    return ChatSession(model, tok, get_template("qwen2_vl", tok), max_new_tokens=N_NEW, do_sample=False,
                       vision=ChatImages(_proc(), tok, torch.device("cpu")) if vision else None)


def test_chat_images_and_image_command_give_the_reference_tokens(tmp_path, spy):
    """A piped conversation (``--history``): ``/image`` before the first and the third line; each reply equals the
    reference greedy tokens of the hand-written conversation with all images so far, in order."""
    ims = _images(tmp_path)
    tok = _tokenizer()
    model = _model(tok).eval()
    session = _session(tok, model)
    stdin = io.StringIO(f"/image {ims[2]}\ndescribe the picture\nred square\n/image {ims[0]}\ncompare two pictures\n")
    out = io.StringIO()
    assert run_chat(session, stdin, out, interactive=False, history=True) == 0
    assert len(spy) == 3
    d = tok.decode
    want1 = _greedy(model, tok, [{"role": "user", "content": _vision(2) + "describe the picture"}], [ims[2]])
    assert spy[0] == want1
    hist = [{"role": "user", "content": _vision(2) + "describe the picture"},
            {"role": "assistant", "content": d(want1, skip_special_tokens=True)}]
    want2 = _greedy(model, tok, hist + [{"role": "user", "content": "red square"}], [ims[2]])
    assert spy[1] == want2
    hist += [{"role": "user", "content": "red square"},
             {"role": "assistant", "content": d(want2, skip_special_tokens=True)}]
    want3 = _greedy(model, tok, hist + [{"role": "user", "content": _vision(0) + "compare two pictures"}],
                    [ims[2], ims[0]])
    assert spy[2] == want3
    assert out.getvalue().splitlines()[0] == "Assistant: " + d(want1, skip_special_tokens=True) + " [...]"
    # the prompt itself (the random model barely reacts to where an image is): placeholders before the text
    tpl = get_template("qwen2_vl", tok)
    assert session._encode([{"role": "user", "content": "red square", "images": [ims[1]]}])[0] == \
        list(tpl.encode_prompt([{"role": "user", "content": _vision(1) + "red square"}], system=None))
    # the image matters (another picture gives other tokens)
    assert want1 != _greedy(model, tok, [{"role": "user", "content": _vision(1) + "describe the picture"}], [ims[1]])


def test_written_placeholders_place_the_images(tmp_path, spy):
    """``<image>`` written in the text marks where the images go (two images, text between)."""
    ims = _images(tmp_path)
    tok = _tokenizer()
    model = _model(tok).eval()
    session = _session(tok, model)
    session.pending = [ims[1], ims[0]]
    session.reply("compare <image> and <image> .")
    want = _greedy(model, tok, [{"role": "user", "content": f"compare {_vision(1)} and {_vision(0)} ."}],
                   [ims[1], ims[0]])
    assert spy[0] == want


def test_image_command_errors(tmp_path, capsys):
    ims = _images(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    tok = _tokenizer()
    model = _model(tok).eval()
    session = _session(tok, model)
    for bad, what in ((tmp_path / "missing.png", "no such file"), (tmp_path / "notes.txt", "not an image"),
                      (tmp_path, "no such file")):
        with pytest.raises(LLMTuneError, match=f"/image {bad}: {what}"):   # piped: the error ends the run
            run_chat(session, io.StringIO(f"/image {bad}\n"), io.StringIO(), interactive=False)
    # at a terminal: one error line on stderr, the session goes on (the image is not attached)
    out = io.StringIO()
    run_chat(session, io.StringIO(f"/image {tmp_path / 'missing.png'}\n/image '{ims[0]}'\n"), out, interactive=True)
    err = capsys.readouterr().err
    assert err.count("Error: /image") == 1 and "missing.png: no such file" in err
    assert "Image attached to your next message." in out.getvalue() and session.pending == [ims[0]]
    text_only = _session(tok, model, vision=False)
    with pytest.raises(LLMTuneError, match="text-only model"):
        text_only.attach(ims[0])


def test_images_flag_parsing(tmp_path):
    assert pop_images_flag(["--model_name_or_path", "m", "--images", "a.png, b.png", "--x", "1"]) == \
        (["--model_name_or_path", "m", "--x", "1"], ["a.png", "b.png"])
    assert pop_images_flag(["--images=a.png"]) == ([], ["a.png"])
    with pytest.raises(LLMTuneError, match="--images needs a value"):
        pop_images_flag(["--images", "--template", "x"])


def test_chat_main_with_images_flag(tmp_path, spy, monkeypatch, capsys):
    """``llmtune chat --images`` end to end (the folder's processor, the first message gets the image); a text-only
    model and a missing file are one error each."""
    from reliability_helpers import make_model_folder

    ims = _images(tmp_path)
    folder = _vl_folder(tmp_path / "vl")
    args = ["--model_name_or_path", str(folder), "--template", "qwen2_vl", "--do_sample", "false",
            "--max_new_tokens", str(N_NEW), "--infer_dtype", "float32"]
    monkeypatch.setattr("sys.stdin", io.StringIO("describe the picture\n"))
    assert chat_mod.main(args + ["--images", ims[1]]) == 0
    tok = _tokenizer()
    want = _greedy(_model(tok).eval(), tok, [{"role": "user", "content": _vision(1) + "describe the picture"}],
                   [ims[1]])
    assert spy[0] == want
    assert "Assistant: " + tok.decode(want, skip_special_tokens=True) in capsys.readouterr().out
    with pytest.raises(LLMTuneError, match=r"--images .*nope\.png: no such file"):
        chat_mod.main(args + ["--images", str(tmp_path / "nope.png")])
    text = make_model_folder(tmp_path / "text")
    with pytest.raises(LLMTuneError, match="--images: the model .* is a text-only model"):
        chat_mod.main(["--model_name_or_path", str(text), "--images", ims[0]])


# ---------------------------------------------------------------------------------------------------
# llmtune api
# ---------------------------------------------------------------------------------------------------
def _body(parts, **kw):
    return {"model": "vl", "temperature": 0, "max_tokens": N_NEW, **kw,
            "messages": [{"role": "user", "content": parts}]}


def test_api_image_url_parts(tmp_path):
    """A data URL, a path and a ``file://`` URL of the same image give the same reply, equal to the reference;
    bad parts are 400s in OpenAI's error shape naming the part; a text-only server refuses image parts."""
    httpx = pytest.importorskip("httpx")
    from reliability_helpers import make_model_folder
    from serve_helpers import live_server

    ims = _images(tmp_path)
    folder = _vl_folder(tmp_path / "vl")
    data = "data:image/png;base64," + base64.b64encode(open(ims[0], "rb").read()).decode()
    tok = _tokenizer()
    want = tok.decode(_greedy(_model(tok).eval(), tok, [{"role": "user", "content": "describe " + _vision(0) +
                                                         " the picture"}], [ims[0]]), skip_special_tokens=True)
    with live_server(["--model_name_or_path", str(folder), "--template", "qwen2_vl", "--infer_dtype", "float32",
                      "--served_model_name", "vl", "--allowed_local_media_path", str(tmp_path)]) as (base, state):
        state.chat_stop_ids = []      # see the module docstring
        replies = []
        for url in (data, ims[0], "file://" + ims[0]):
            parts = [{"type": "text", "text": "describe "}, {"type": "image_url", "image_url": {"url": url}},
                     {"type": "text", "text": " the picture"}]
            r = httpx.post(base + "/v1/chat/completions", json=_body(parts), timeout=120)
            assert r.status_code == 200, r.text
            replies.append(r.json()["choices"][0]["message"]["content"])
            assert r.json()["usage"]["completion_tokens"] == N_NEW
        assert replies == [want] * 3
        from llmtune.serve.app import chat_prompt
        from llmtune.serve.protocol import parse_chat

        for k, parts in ((1, [{"type": "text", "text": "describe "},
                               {"type": "image_url", "image_url": {"url": ims[1]}},
                               {"type": "text", "text": " the picture"}]),
                         (2, [{"type": "image_url", "image_url": {"url": ims[2]}}, {"type": "text", "text": "hello"}])):
            _, turns, system = parse_chat(_body(parts), media_root=str(tmp_path.resolve()))
            prompt, vision = chat_prompt(state, turns, system, None)     # the image where its part is
            text = "describe " + _vision(1) + " the picture" if k == 1 else _vision(2) + "hello"
            assert prompt == list(get_template("qwen2_vl", tok).encode_prompt([{"role": "user", "content": text}],
                                                                               system=state.system))
            assert torch.equal(vision["pixel_values"], _proc()([ims[k]])["pixel_values"])
        parts = [{"type": "text", "text": "describe "}, {"type": "image_url", "image_url": {"url": data}},
                 {"type": "text", "text": " the picture"}]
        with httpx.stream("POST", base + "/v1/chat/completions", json=_body(parts, stream=True), timeout=120) as r:
            lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        assert "".join(json.loads(x)["choices"][0]["delta"].get("content") or "" for x in lines[:-1]) == want
        (tmp_path / "notes.txt").write_text("not an image")
        outside = tmp_path.parent / (tmp_path.name + "-outside") / "a.png"     # a real image, not in the folder
        outside.parent.mkdir(exist_ok=True)
        outside.write_bytes(open(ims[0], "rb").read())
        from llmtune.serve.errors import APIError

        with pytest.raises(APIError, match="reads no local files.*--allowed_local_media_path"):
            parse_chat(_body([{"type": "image_url", "image_url": {"url": ims[0]}}]))   # no folder allowed
        bad = [({"url": "https://example.com/a.png"}, "does not fetch URLs"),
               ({"url": str(tmp_path / "missing.png")}, "no such image file on the server: .*missing.png"),
               ({"url": str(tmp_path / "notes.txt")}, "not an image Pillow can read"),
               ({"url": "data:image/png;base64,@@@"}, "base64 data does not decode"),
               ({"url": "data:image/png;base64," + base64.b64encode(b"text").decode()}, "not an image Pillow"),
               ({"url": "ftp://host/a.png"}, "unsupported URL scheme"),
               ({"url": str(outside)}, "outside the folder this server may read images from"),
               ({"url": str(tmp_path / ".." / outside.parent.name / outside.name)}, "outside the folder"),
               ({"url": "file://" + str(outside)}, "outside the folder")]
        for image_url, msg in bad:
            parts = [{"type": "text", "text": "describe"}, {"type": "image_url", "image_url": image_url}]
            r = httpx.post(base + "/v1/chat/completions", json=_body(parts), timeout=60)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "messages[0].content[1]" and err["type"] == "invalid_request_error"
            assert set(err) == {"message", "type", "param", "code"}
            assert re.search(msg, err["message"]), err["message"]
        r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": "vl", "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": [
                {"type": "image_url", "image_url": {"url": data}}]}, {"role": "user", "content": "hello"}]})
        assert r.status_code == 400 and "only allowed in user messages" in r.json()["error"]["message"]
        parts = [{"type": "text", "text": "compare <image> and"}, {"type": "image_url", "image_url": {"url": data}}]
        r = httpx.post(base + "/v1/chat/completions", json=_body(parts), timeout=60)   # 2 placeholders, 1 image
        assert r.status_code == 400 and "placeholder" in r.json()["error"]["message"]
    text = make_model_folder(tmp_path / "text")
    with live_server(["--model_name_or_path", str(text), "--served_model_name", "vl"]) as (base, _):
        r = httpx.post(base + "/v1/chat/completions", timeout=60,
                       json=_body([{"type": "image_url", "image_url": {"url": data}}]))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages[0].content" and "messages[0].content[0]: the served model 'vl' is a " \
            "text-only model" in err["message"]
        assert json.loads(r.text)["error"]["code"] == "unsupported_parameter"
