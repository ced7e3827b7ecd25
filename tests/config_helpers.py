"""``make_config(**keys)``: the real :class:`llmtune.config.TrainConfig` for tests (no key required)."""

from llmtune.config import TrainConfig, parse_config


def make_config(**keys) -> TrainConfig:
    """A checked TrainConfig from LLaMA-Factory keys, as ``llmtune.train`` builds it (defaults from the config)."""
    return parse_config(keys, command=None)
