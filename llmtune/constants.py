"""Constants shared across llmtune.

``IGNORE_INDEX``: the label value of tokens that carry no loss (prompt, padding). It is PyTorch's
``F.cross_entropy(ignore_index=-100)`` default and Hugging Face's convention for ``labels``.
"""

IGNORE_INDEX = -100
