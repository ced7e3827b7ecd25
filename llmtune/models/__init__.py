"""Model definitions (one :class:`Transformer` for Llama, Mistral, Qwen2, Qwen3) and loading."""

from llmtune.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from llmtune.models.transformer import KVCache, Transformer

__all__ = ["ModelConfig", "Transformer", "KVCache", "SUPPORTED_ARCHITECTURES"]
