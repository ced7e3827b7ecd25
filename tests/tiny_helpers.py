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
