"""Data: dataset registry -> rows -> internal examples -> token rows per stage, chat templates, collators.

Public API::

    from llmtune.data import get_template, get_dataset
    template = get_template("chatml", tokenizer)        # or None: the model's own chat template
    splits = get_dataset(cfg, tokenizer, template, "sft")  # DatasetSplits(train, eval)
    collate = get_collator("sft", pad_token_id)          # list[row] -> dict of tensors

See docs/data.md for the formats, templates and masking rules.
"""

from llmtune.data.collator import get_collator
from llmtune.data.dataset import DatasetSplits, get_dataset
from llmtune.data.templates import TEMPLATES, get_template

__all__ = ["get_template", "get_dataset", "DatasetSplits", "get_collator", "TEMPLATES"]
