"""Stages kto, rm and grpo with images on a tiny random-init Qwen2.5-VL and generated images: kto rows (and their
mismatched ``kl_`` completions) carry the prompt's images, a batch's log-probs equal per-sequence forwards with
each sequence's own images; 2-step runs through ``llmtune.train``; grpo reward functions receive the images."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL.Image")

from test_vl_sft import _attr, _images, _model, _pair_rows, _tokenizer, _vl_folder  # noqa: E402

from llmtune.data.collator import KTOCollator, SFTCollator  # noqa: E402
from llmtune.data.formats import convert  # noqa: E402
from llmtune.data.images import QwenVLImageProcessor  # noqa: E402
from llmtune.data.multimodal import ImageCollator, ImageEncoder, collate_images, vision_inputs  # noqa: E402
from llmtune.data.templates import get_template  # noqa: E402
from llmtune.losses import sequence_logps  # noqa: E402


def _kto_rows(tmp_path):
    p = _images(tmp_path)
    conv = lambda u, a: [{"from": "human", "value": u}, {"from": "gpt", "value": a}]  # noqa: E731
    return [{"conversations": conv("<image> describe the picture", "a red square"), "label": True,
             "images": [p[0]]},
            {"conversations": conv("compare <image> and <image>", "two red squares"), "label": False,
             "images": [p[1], p[2]]},
            {"conversations": conv("hello", "hello world"), "label": True}]


def _data(tmp_path, name, make_rows, columns, **extra):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    rows = make_rows(data)
    for r in rows:       # image paths relative to dataset_dir, as LLaMA-Factory's mllm_demo
        r["images"] = [p.rsplit("/", 1)[1] for p in r.get("images", [])]
    (data / f"{name}.json").write_text(json.dumps(rows * 2))
    (data / "dataset_info.json").write_text(json.dumps({name: {
        "file_name": f"{name}.json", "formatting": "sharegpt", "columns": dict(columns, images="images"),
        **extra}}))
    return data


def test_kto_rows_give_completion_and_kl_completion_the_prompt_images(tmp_path):
    """Each completion and each kl_ completion (another row's answer after this row's prompt) scored in the
    batch equals a forward of that sequence alone with its own prompt's images."""
    tok, proc = _tokenizer(), QwenVLImageProcessor(min_pixels=16, max_pixels=64 * 64, patch_size=4)
    attr = _attr()
    attr.columns["kto_tag"] = "label"
    examples, _ = convert(attr, _kto_rows(tmp_path))
    enc = ImageEncoder(get_template("qwen2_vl", tok), tok, 512, processor=proc, dataset="kto")
    rows = [enc.encode_kto(ex, examples[(i + 1) % 3].responses[0]) for i, ex in enumerate(examples)]
    assert [len(r.get("images", [])) for r in rows] == [1, 2, 0]
    batch = ImageCollator(KTOCollator(tok.pad_token_id), proc)(rows)
    model = _model(tok).eval()
    with torch.no_grad():
        got = []
        for side in ("", "kl_"):
            h = model(batch[side + "input_ids"], attention_mask=batch[side + "attention_mask"],
                      position_ids=batch[side + "position_ids"], **vision_inputs(batch))
            got.append(sequence_logps(h, model.lm_head.weight, batch[side + "labels"]))
            for r in rows:   # no label on a vision token
                vision = [t in (tok.convert_tokens_to_ids("<|image_pad|>"),) for t in r[side + "input_ids"]]
                assert all(lab == -100 for lab, v in zip(r[side + "labels"], vision) if v)
        want = []
        for side in ("", "kl_"):
            for r in rows:
                one = {"input_ids": r[side + "input_ids"], "labels": r[side + "labels"], "images": r.get("images")}
                b = SFTCollator(tok.pad_token_id)([one])
                b.update(collate_images([one], proc))
                want.append(sequence_logps(model(b["input_ids"], **vision_inputs(b)), model.lm_head.weight,
                                           b["labels"])[0])
    assert torch.allclose(torch.cat(got), torch.stack(want), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("stage", ["kto", "rm"])
def test_kto_and_rm_runs_with_images_through_the_train_api(tmp_path, stage):
    import llmtune

    folder = _vl_folder(tmp_path / "vl")
    if stage == "kto":
        data = _data(tmp_path, "d", _kto_rows, {"messages": "conversations", "kto_tag": "label"})
    else:
        data = _data(tmp_path, "d", _pair_rows, {"messages": "conversations", "chosen": "chosen",
                                                          "rejected": "rejected"}, ranking=True)
    res = llmtune.train(dict(stage=stage, model_name_or_path=str(folder), dataset="d", dataset_dir=str(data),
                             template="qwen2_vl", finetuning_type="lora", lora_rank=4, freeze_vision_tower=False,
                             output_dir=str(tmp_path / "out"), cutoff_len=256, per_device_train_batch_size=3,
                             learning_rate=1e-3, max_steps=2, logging_steps=1, report_to="none",
                             overwrite_cache=True))
    assert np.isfinite(res["train_loss"])


def test_rollouts_with_images_score_as_a_full_forward(tmp_path):
    """generate_rollouts under ``generation_images`` (prompts of different lengths and images, left-padded, rows
    finishing early are dropped from the cache): every sampled token's log-prob equals the one a full forward of
    prompt + completion with the images gives (policy_forward), so decoding used the right M-RoPE ids."""
    from llmtune.rollout import generate_rollouts
    from llmtune.train.stages.grpo import drop_vision_completions
    from llmtune.train.stages.ppo import policy_forward

    tok, proc = _tokenizer(), QwenVLImageProcessor(min_pixels=16, max_pixels=64 * 64, patch_size=4)
    attr = _attr()
    examples, _ = convert(attr, [{"conversations": r["conversations"][:1], "images": r.get("images", [])}
                                 for r in _kto_rows(tmp_path)])
    enc = ImageEncoder(get_template("qwen2_vl", tok), tok, 512, processor=proc, dataset="prompts")
    enc.prompts_with_images = True
    rows = [enc.encode_ppo(ex) for ex in examples]
    vision = [proc(r["images"]) if r.get("images") else {} for r in rows]
    model = _model(tok).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), model.generation_images([v for v in vision for _ in range(4)]):
        ro = generate_rollouts(model, [r["input_ids"] for r in rows], max_new_tokens=6, do_sample=True,
                               eos_token_ids=[tok.convert_tokens_to_ids("it")], generator=g, num_return_sequences=4)
    vision = [v for v in vision for _ in range(4)]
    keep = ro.completion_mask.clone()
    n_bad = drop_vision_completions(ro.input_ids, keep, ro.prompt_len, [tok.convert_tokens_to_ids("<|image_pad|>"),
                                    tok.convert_tokens_to_ids("<|video_pad|>")], tok.pad_token_id)
    assert n_bad < 8 and bool(ro.truncated.any()) and bool((~ro.truncated).any())   # rows end early and late
    with torch.no_grad():
        full = policy_forward(model, ro.input_ids, ro.attention_mask, ro.prompt_len, ro.completion_mask,
                              values=False, pixel_values=torch.cat([v["pixel_values"] for v in vision if v]),
                              image_grid_thw=torch.cat([v["image_grid_thw"] for v in vision if v]))
    m = keep.bool()
    assert (full["logps"][m] - ro.logps[m]).abs().max().item() <= 1e-4


def test_grpo_run_with_images_gives_reward_functions_the_images(tmp_path):
    import llmtune

    folder = _vl_folder(tmp_path / "vl")
    data = _data(tmp_path, "d", lambda d: [{"conversations": r["conversations"][:1], "images": r.get("images", [])}
                                           for r in _kto_rows(d)], {"messages": "conversations"})
    log = tmp_path / "seen.jsonl"
    (tmp_path / "rewards.py").write_text(
        "import json\n"
        "def seen(prompts, completions, images=None, **kw):\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(json.dumps(images) + '\\n')\n"
        "    return [float(len(c)) for c in completions]\n")
    res = llmtune.train(dict(stage="grpo", model_name_or_path=str(folder), dataset="d", dataset_dir=str(data),
                             template="qwen2_vl", finetuning_type="lora", lora_rank=4,
                             reward_funcs=f"{tmp_path / 'rewards.py'}:seen", output_dir=str(tmp_path / "out"),
                             cutoff_len=256, per_device_train_batch_size=3, gradient_accumulation_steps=1,
                             num_generations=3, max_completion_length=4, beta=0.1, num_iterations=2,
                             learning_rate=1e-3, max_steps=2, logging_steps=1, report_to="none",
                             overwrite_cache=True))
    assert np.isfinite(res["train_loss"])
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls and all(len(c) == 3 for c in calls)          # one entry per completion (3 = one prompt x 3)
    seen = {tuple(p.rsplit("/", 1)[1] for p in imgs) for c in calls for imgs in c}
    assert seen <= {("im0.png",), ("im1.png", "im2.png"), ()} and seen & {("im0.png",), ("im1.png", "im2.png")}
    for c in calls:
        assert all(p.startswith(str(data)) for imgs in c for p in imgs)


def test_engine_slot_offsets_follow_moved_and_reused_slots(tmp_path):
    """The generation engine with per-request images, two slots, greedy: A (one image) stops after one token, so B
    (text only) moves into A's slot; C (two images) takes slot 1 and stops at once; D (text only) is prefilled
    into that slot while B still runs. Every generated token's log-prob equals a full forward of that request's
    prompt + completion with its own images (B decoding with A's M-RoPE offset, or D with C's, would differ).
    Sampling a vision token stops a row (it cannot be fed back without image features)."""
    from llmtune.engine import Engine, Request

    tok, proc = _tokenizer(), QwenVLImageProcessor(min_pixels=16, max_pixels=64 * 64, patch_size=4)
    examples, _ = convert(_attr(), [{"conversations": r["conversations"][:1], "images": r.get("images", [])}
                                    for r in _kto_rows(tmp_path)])
    enc = ImageEncoder(get_template("qwen2_vl", tok), tok, 512, processor=proc, dataset="prompts")
    enc.prompts_with_images = True
    rows = [enc.encode_ppo(ex) for ex in examples]
    vision = [proc(r["images"]) if r.get("images") else None for r in rows]
    model = _model(tok).eval()
    stop = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    plan = [(0, 1), (2, 6), (1, 1), (2, 4)]          # (prompt row, max_new_tokens) of A, B, C, D
    reqs = [Request(rows[i]["input_ids"], k, stop_ids=stop, logprobs=True, images=vision[i]) for i, k in plan]
    engine = Engine(model, max_slots=2, max_len=max(len(r["input_ids"]) for r in rows) + 6)
    done = engine.run(reqs)
    assert len(done[0].tokens) == len(done[2].tokens) == 1 and len(done[1].tokens) >= 3 and len(done[3].tokens) >= 2
    with torch.no_grad():
        for (i, _), c in zip(plan, done):
            ids = torch.tensor([list(rows[i]["input_ids"]) + c.tokens[:-1]])
            h = model(ids, **(vision[i] or {}))
            lp = torch.log_softmax(model.lm_head(h[0, -len(c.tokens):]).float(), -1)
            want = lp[torch.arange(len(c.tokens)), torch.tensor(c.tokens)]
            assert (want - torch.tensor(c.logprobs)).abs().max().item() <= 1e-4
