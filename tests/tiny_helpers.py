"""A tiny random Llama-shaped model and random sft rows, shared by the trainer and distributed tests."""

from __future__ import annotations

import torch

from llmtune.models import ModelConfig, Transformer

VOCAB = 61


def tiny_model(seed: int = 0) -> Transformer:
    """A 2-layer float32 :class:`Transformer` (hidden 32, GQA 4/2 heads, tied embeddings), seeded."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Transformer(cfg).float()


def rows(lengths, seed=0, prompt=2):
    """One sft row per length: random ids in ``[1, VOCAB)``, the first ``prompt`` labels -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        labels = [-100] * min(prompt, n - 2) + ids[min(prompt, n - 2):]
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": labels})
    return out


def real_tokenizer_folder(real_model_path, folder, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2):
    """A random tiny Llama folder (config.json, model.safetensors) with the real model's tokenizer (vocabulary
    49,152), for command-line runs of real data in seconds. Returns ``folder``."""
    import json

    from safetensors.torch import save_file

    from llmtune.tokenizer import load_tokenizer

    tok = load_tokenizer(str(real_model_path))
    folder.mkdir()
    tok.save_pretrained(str(folder))
    mc = ModelConfig(vocab_size=49152, hidden_size=hidden_size, intermediate_size=intermediate_size,
                     num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                     num_key_value_heads=num_key_value_heads, tie_word_embeddings=True,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Transformer(mc)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(mc.to_hf_dict()))
    return folder
