"""One typed configuration for ``llmtune train``, ``chat`` and ``export`` (and the Python API).

* :mod:`llmtune.config.keys`: :class:`TrainConfig`, every key with its type, default, allowed values, bounds,
  topic and one-line description (LLaMA-Factory names; the seed's spellings in :data:`ALIASES`);
* :mod:`llmtune.config.checks`: conversion, normalisation and checks, run once when a config is built;
* :mod:`llmtune.config.parse`: :func:`parse_config` from argv words, a YAML/JSON file or a dict;
* :mod:`llmtune.config.help`: ``--help`` text generated from the keys.

Typical use::

    cfg = parse_config(["recipe.yaml", "--lora_rank", "16"], command="train")
    cfg.pref_beta          # typed fields, defaults written once in keys.py
"""

from llmtune.config.checks import COMMANDS, check_values, validate
from llmtune.config.help import config_help
from llmtune.config.keys import (ALIASES, FINETUNING_TYPES, GROUPS, IGNORED_KEYS, KEYS, PREF_LOSSES, SCHEDULERS,
                                 STAGE_ALIASES, STAGES, TrainConfig)
from llmtune.config.parse import BARE_FLAG, parse_config, read_config_file, split_argv

__all__ = ["ALIASES", "BARE_FLAG", "COMMANDS", "FINETUNING_TYPES", "GROUPS", "IGNORED_KEYS", "KEYS", "PREF_LOSSES",
           "SCHEDULERS", "STAGES", "STAGE_ALIASES", "TrainConfig", "check_values", "config_help", "parse_config",
           "read_config_file", "split_argv", "validate"]
