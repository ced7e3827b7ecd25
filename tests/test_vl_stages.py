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
