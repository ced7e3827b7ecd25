"""``get_dataset``: registry -> rows -> examples -> encoded rows for one stage, cached, split.

Reads these keys of the run's :class:`llmtune.config.TrainConfig` (defaults and meanings there):
``dataset`` (comma-separated names or file paths), ``eval_dataset``, ``dataset_dir``, ``cutoff_len``,
``train_on_prompt``, ``mask_history``, ``max_samples`` (per dataset, first rows), ``val_size`` (fraction < 1 or
a count; seeded split), ``seed``, ``packing`` / ``neat_packing`` (sft), ``overwrite_cache``, ``data_cache_dir``
or ``cache_dir`` (default :func:`llmtune.data.cache.default_cache_dir`), ``kto_alpha`` (dpo: datasets without
pairs become ``sft_only`` rows).
``tool_format`` and ``default_system``, when set and the given template differs, rebuild the template with
them. ``streaming`` and ``preprocessing_num_workers`` are ignored.

Which data serves which stage: ``pt`` any text (a row's messages joined by newlines); ``sft`` rows with an
answer (preference rows train on ``chosen``, KTO rows on the desirable ones, ranked lists on the best);
``rm``/``dpo`` pairs (ranked lists give every ordered pair); ``kto`` labelled rows (a pair gives one
desirable and one undesirable example); ``ppo`` any prompt; ``grpo`` any prompt, each row keeping the dataset
row's own columns under ``columns`` (passed to reward functions by name, TRL's convention).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from llmtune.data import cache
from llmtune.data.batched import encode_in_batches
from llmtune.data.encode import Encoder, pack_rows
from llmtune.data.formats import Example, check_columns, convert, detect_format
from llmtune.data.loaders import data_files, read_file
from llmtune.data.multimodal import ImageEncoder, model_processor, processor_key
from llmtune.data.registry import TYPE_STAGES, DatasetAttr, resolve
from llmtune.errors import LLMTuneError, notice

STAGE_ALIASES = {"pretrain": "pt", "rlhf": "ppo"}


@dataclass
class DatasetSplits:
    """Encoded rows: ``train`` (list of row dicts) and ``eval`` (list, or None without eval data)."""

    train: list
    eval: Optional[list] = None


def as_config(args: Any) -> Any:
    """``args`` if it is a :class:`llmtune.config.TrainConfig`, else a dict of keys built into one (no key is
    required). Raises :class:`LLMTuneError` for a bad key or value."""
    from llmtune.config import TrainConfig, parse_config

    return args if isinstance(args, TrainConfig) else parse_config(args, command=None)


def _names(value: Any) -> list[str]:
    if not value:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def get_dataset(args: Any, tokenizer, template, stage: str) -> DatasetSplits:
    """Load, convert, encode (cached) and split the datasets named by ``args.dataset`` for ``stage``.

    Args:
        args: the run's TrainConfig, or a dict of its keys (keys in the module docstring).
        tokenizer: llmtune ``Tokenizer`` (docs/internals.md).
        template: from :func:`llmtune.data.templates.get_template`.
        stage: the data kind, a key of :data:`DATA_KINDS` (``pt``, ``sft``, ``rm``, ``ppo``, ``dpo``, ``kto``,
            ``grpo``; ``pretrain``/``rlhf`` accepted): the ``data`` field of the stage's row in
            :data:`llmtune.train.stages.STAGES`, which is the stage's own name for the stages built in.

    Returns:
        :class:`DatasetSplits` whose rows are dicts of lists of ints (plus ``kto_tag``/``sft_only`` bools), in
        the formats of docs/internals.md.

    Raises:
        LLMTuneError: unknown dataset (nearest names), missing file, malformed JSON (file and line), missing
            column, data that cannot serve ``stage``, empty dataset, every label masked, Hub unreachable.
    """
    args = as_config(args)
    stage = STAGE_ALIASES.get(stage, stage)
    template = _with_overrides(template, args)
    if stage not in DATA_KINDS:
        raise LLMTuneError(f"stage: unknown stage {stage!r}; expected one of {', '.join(DATA_KINDS)}.")
    kind = DATA_KINDS[stage]
    names = _names(args.dataset)
    if not names:
        raise LLMTuneError("dataset: required (a name from dataset_info.json in dataset_dir, or a path to a "
                           ".json/.jsonl file; several joined by commas).")
    train: list = []
    for name in names:
        train += _load_one(name, args, tokenizer, template, stage)
    eval_rows: Optional[list] = None
    eval_names = _names(args.eval_dataset)
    val_size = float(args.val_size)
    if eval_names:
        eval_rows = []
        for name in eval_names:
            eval_rows += _load_one(name, args, tokenizer, template, stage)
        if val_size:
            notice("val_size is ignored because eval_dataset is set.")
    elif val_size > 0:
        n_val = int(round(val_size * len(train))) if val_size < 1 else int(val_size)
        if n_val >= len(train) or n_val < 1:
            raise LLMTuneError(f"val_size: {val_size} leaves no training or no evaluation rows out of "
                               f"{len(train)}; use a fraction in (0, 1) or a smaller count.")
        perm = list(range(len(train)))
        random.Random(args.seed).shuffle(perm)
        val_idx = set(perm[:n_val])
        eval_rows = [train[i] for i in sorted(val_idx)]
        train = [r for i, r in enumerate(train) if i not in val_idx]
    if kind.packs_rows and (args.packing or args.neat_packing):
        cutoff, neat = args.cutoff_len, args.neat_packing
        train = pack_rows(train, cutoff, neat)
        if eval_rows:
            eval_rows = pack_rows(eval_rows, cutoff, neat)
    return DatasetSplits(train=train, eval=eval_rows)


def _with_overrides(template, args: Any):
    """Apply ``tool_format`` / ``default_system`` from ``args`` when the template was built without them."""
    tool_format, default_system = args.tool_format, args.default_system
    if (tool_format is None or tool_format == template.tool_format) and \
            (default_system is None or default_system == template.default_system):
        return template
    from llmtune.data.templates import get_template

    return get_template(template.name, template.tokenizer, tool_format=tool_format or template.tool_format,
                        default_system=default_system if default_system is not None else template.default_system,
                        enable_thinking=not (template.name in ("qwen3", "qwen3_vl") and template.thought_words is None))


def _cache_dir(args: Any) -> Path:
    d = args.data_cache_dir or args.cache_dir
    return Path(d).expanduser() if d else cache.default_cache_dir()


def _load_one(name: str, args: Any, tokenizer, template, stage: str) -> list:
    attr = resolve(name, args.dataset_dir)
    files = data_files(attr)
    kind = DATA_KINDS[stage]
    kto_alpha = args.kto_alpha
    mix_sft = kind.mixes_sft and kto_alpha is not None and float(kto_alpha) > 0
    opts = {"cutoff_len": args.cutoff_len, "train_on_prompt": args.train_on_prompt,
            "mask_history": args.mask_history, "mix_sft": mix_sft, "max_samples": args.max_samples, "seed": args.seed}
    if kind.packs_documents and args.is_set("packing") and not args.packing:   # LLaMA-Factory: unset = packed (pt)
        opts["packing"] = False
    processor = model_processor(args.model_name_or_path, args.image_max_pixels, args.image_min_pixels)
    if processor is not None:   # a vision-language model: image token counts depend on the processor
        opts["image_processor"] = processor_key(processor)
    key = cache.cache_key({"attr": attr.fingerprint(), "files": cache.file_fingerprint(files), "stage": stage,
                           "tokenizer": cache.tokenizer_fingerprint(tokenizer),
                           "template": cache.template_fingerprint(template), "opts": opts})
    cdir = _cache_dir(args)
    if not args.overwrite_cache:
        hit = cache.load(cdir, attr.name, key)
        if hit is not None:
            _report(attr, hit["stats"], opts["cutoff_len"])
            return hit["rows"]
    raw: list[dict] = []
    for f in files:
        raw += read_file(f)
    if not raw:
        raise LLMTuneError(f"dataset {attr.name!r}: no rows in {', '.join(map(str, files))}.")
    attr = detect_format(attr, raw)
    check_columns(attr, raw, ", ".join(str(f) for f in files))
    if attr.num_samples:
        rng = random.Random(opts["seed"])
        idx = list(range(len(raw)))
        rng.shuffle(idx)
        while len(idx) < attr.num_samples:
            idx.append(rng.randrange(len(raw)))
        raw = [raw[i] for i in idx[:attr.num_samples]]
    if opts["max_samples"]:
        raw = raw[:int(opts["max_samples"])]
    text_only = processor is None   # a vision-language model's images are its data
    if text_only:
        _check_text_only(attr, raw, ", ".join(str(f) for f in files))
    examples, skipped = convert(attr, raw, ", ".join(str(f) for f in files))
    if text_only:
        _notice_media_placeholders(attr, examples)
    # grpo: the raw columns travel with each prompt (convert keeps the row order, skips malformed rows)
    kept = _kept_rows(attr, raw) if kind.keeps_columns else None
    _check_type(attr, stage)
    enc = _encoder(attr, examples, processor, template, tokenizer, opts)
    if isinstance(enc, ImageEncoder):
        enc.pairs_with_images = kind.encode is _encode_pairs
        enc.prompts_with_images = kind.keeps_columns

    def encode_all(tpl: Any, tok: Any) -> tuple[Encoder, tuple[list, dict]]:
        e = enc if tok is tokenizer else Encoder(tpl, tok, opts["cutoff_len"], opts["train_on_prompt"],
                                                 opts["mask_history"])
        return e, kind.encode(attr, examples, e, stage, mix_sft=mix_sft, packing=opts.get("packing", True),
                              raw_rows=kept)

    # text only: the texts tokenized in batches, the rows the same (llmtune.data.batched)
    enc, (rows, stats) = (encode_in_batches(encode_all, template, tokenizer) if type(enc) is Encoder
                          else encode_all(template, tokenizer))
    if getattr(enc, "cut_images", 0):
        stats["notes"].append(f"dropped {enc.cut_images} example(s) whose image tokens cutoff_len="
                              f"{opts['cutoff_len']} cut through; raise cutoff_len or lower image_max_pixels.")
    stats["malformed"] = skipped
    stats["truncated"] = enc.truncated
    stats["rows"] = len(raw)
    if not rows:
        raise LLMTuneError(f"dataset {attr.name!r}: no example left to train on for stage {stage} "
                           f"({len(raw)} rows, {skipped} malformed, {stats.get('dropped', 0)} with every label "
                           f"masked, e.g. by cutoff_len={opts['cutoff_len']}); check the data and its columns.")
    cache.save(cdir, attr.name, key, rows, stats)
    _report(attr, stats, opts["cutoff_len"])
    return rows


def _encoder(attr: DatasetAttr, examples: list[Example], processor, template, tokenizer, opts: dict) -> Encoder:
    """The stage encoder; an :class:`~llmtune.data.multimodal.ImageEncoder` when examples have images.
    Raises LLMTuneError for images with a model that has no vision tower."""
    args = (template, tokenizer, opts["cutoff_len"], opts["train_on_prompt"], opts["mask_history"])
    if processor is not None:   # a vision-language model: <image> placeholders are checked even without images
        return ImageEncoder(*args, processor=processor, base_dir=attr.dataset_dir, dataset=attr.name)
    if not any(ex.images for ex in examples):
        return Encoder(*args)
    raise LLMTuneError(f"dataset {attr.name!r} has images, but model_name_or_path is not a vision-language "
                       "model folder (config.json without vision_config); use a Qwen2-VL / Qwen2.5-VL / "
                       "Qwen3-VL model, or drop the images column")


MEDIA = ("images", "videos", "audios")


def _check_text_only(attr: DatasetAttr, raw: list[dict], where: str) -> None:
    """Refuse image/video/audio columns for a text-only model: training on the text alone while the rows
    point at pictures teaches the wrong thing silently.

    Raises:
        LLMTuneError: a media column mapped in dataset_info.json, or present with values in the rows.
    """
    for role in MEDIA:
        col = attr.columns.get(role, role)
        row = next((i for i, r in enumerate(raw[:1000]) if r.get(col)), None)
        if role in attr.explicit or row is not None:
            raise LLMTuneError(f"dataset {attr.name!r}: {where}, column {col!r} ({role}): this is a text-only "
                               "model, which cannot see them; use a vision-language model or a text dataset, or "
                               "drop the column from the rows and from \"columns\" in dataset_info.json")


def _notice_media_placeholders(attr: DatasetAttr, examples: list) -> None:
    """One notice when messages hold ``<image>``/``<video>``/``<audio>`` (multimodal placeholders a text model
    reads as plain text)."""
    tags = ("<image>", "<video>", "<audio>")
    hits = sum(1 for ex in examples if any(t in str(m.get("content", "")) for m in ex.prompt + ex.responses
                                           for t in tags))
    if hits:
        notice(f"dataset {attr.name!r}: {hits} example(s) hold <image>/<video>/<audio> placeholders; this is a "
               "text-only model, so they are trained on as literal text")


def _kept_rows(attr: DatasetAttr, raw: list[dict]) -> list[dict]:
    """The raw rows that :func:`convert` turns into examples (it skips malformed ones), in order."""
    return [row for row in raw if convert(attr, [row])[0]]


def _report(attr: DatasetAttr, stats: dict, cutoff_len: int) -> None:
    if stats.get("malformed"):
        notice(f"dataset {attr.name!r}: skipped {stats['malformed']} malformed row(s) (roles not alternating "
               "user/assistant, or unknown role tags).")
    if stats.get("truncated"):
        notice(f"dataset {attr.name!r}: {stats['truncated']} example(s) longer than cutoff_len={cutoff_len} tokens "
               "were truncated (keeping each kept answer's end-of-turn token); raise cutoff_len to keep them whole.")
    if stats.get("dropped"):
        notice(f"dataset {attr.name!r}: dropped {stats['dropped']} example(s) with no token left to train on.")
    for msg in stats.get("notes", []):
        notice(f"dataset {attr.name!r}: {msg}")


def _check_type(attr: DatasetAttr, stage: str) -> None:
    if attr.type_hint and stage not in TYPE_STAGES[attr.type_hint]:
        notice(f"dataset {attr.name!r} is registered with type {attr.type_hint!r}, which does not usually serve "
               f"stage {stage}; using it anyway.")


def _document(ex: Example) -> str:
    parts = [m["content"] for m in ex.prompt if m.get("content")]
    if ex.responses:
        parts.append(ex.responses[0]["content"])
    return "\n".join(parts)


def _encode_text(attr: DatasetAttr, examples: list[Example], enc: Encoder, stage: str, *, packing: bool = True,
                 **_: Any) -> tuple[list, dict]:
    """Kind ``pt``: every example as one document (a row's messages joined by newlines), packed to cutoff_len."""
    return enc.encode_pretrain([_document(ex) for ex in examples], packing=packing), {"dropped": 0, "notes": []}


def _encode_prompts(attr: DatasetAttr, examples: list[Example], enc: Encoder, stage: str, *,
                    raw_rows: Optional[list[dict]] = None, **_: Any) -> tuple[list, dict]:
    """Kinds ``ppo`` (prompts) and ``grpo`` (prompts, each keeping its raw dataset row under ``columns``)."""
    rows, stats, add = _collector()
    pairs = zip(examples, raw_rows) if raw_rows is not None else ((ex, None) for ex in examples)
    for ex, raw in pairs:
        row = enc.encode_ppo(ex)
        if row is not None and raw is not None:
            row["columns"] = dict(raw)
        add(row)
    return rows, stats


def _encode_answers(attr: DatasetAttr, examples: list[Example], enc: Encoder, stage: str, **_: Any
                    ) -> tuple[list, dict]:
    """Kind ``sft``: rows with an answer (the chosen answer of pairs, the best of ranked lists, desirable KTO
    examples).

    Raises: LLMTuneError for data without answers."""
    rows, stats, add = _collector()
    kinds = {ex.kind for ex in examples}
    if kinds <= {"prompt"}:
        raise LLMTuneError(f"dataset {attr.name!r} has no answers (no response/output column, or sharegpt "
                           "conversations without an assistant turn); sft needs them (for plain text use "
                           "stage pt).")
    if kinds & {"pair", "ranked"}:
        stats["notes"].append("preference rows: sft trains on the chosen (best) answer.")
    if "kto" in kinds:
        stats["notes"].append("KTO rows: sft trains on the desirable (kto_tag true) examples only.")
    for ex in examples:
        if ex.kind in ("sft", "pair", "ranked") or (ex.kind == "kto" and ex.kto_tag):
            add(enc.encode_sft(ex))
    return rows, stats


def _encode_pairs(attr: DatasetAttr, examples: list[Example], enc: Encoder, stage: str, *, mix_sft: bool = False,
                  **_: Any) -> tuple[list, dict]:
    """Kinds ``rm`` and ``dpo``: chosen/rejected pairs (ranked lists give every ordered pair); with ``mix_sft``
    (dpo + ``kto_alpha``) plain answers become ``sft_only`` rows.

    Raises: LLMTuneError for data without pairs."""
    rows, stats, add = _collector()
    kinds = {ex.kind for ex in examples}
    for ex in examples:
        if ex.kind == "pair":
            add(enc.encode_pair(ex, ex.responses[0], ex.responses[1]))
        elif ex.kind == "ranked":
            for i in range(len(ex.responses)):
                for j in range(i + 1, len(ex.responses)):
                    add(enc.encode_pair(ex, ex.responses[i], ex.responses[j]))
        elif ex.kind in ("sft", "kto") and mix_sft:
            row = enc.encode_sft(ex) if (ex.kind == "sft" or ex.kto_tag) else None
            if row is not None:
                row["sft_only"] = True
                rows.append(row)
    if not rows and kinds & {"sft", "kto"} and not (kinds & {"pair", "ranked"}):
        if DATA_KINDS[stage].mixes_sft:
            raise LLMTuneError(f"dataset {attr.name!r} has no chosen/rejected pairs; stage {stage} uses such plain "
                               "sft rows only as the knowledge term of the seed's mix (set kto_alpha, e.g. "
                               "--kto_alpha 0.5, and give a preference dataset too).")
        raise LLMTuneError(f"dataset {attr.name!r} has no chosen/rejected pairs (columns chosen/rejected with "
                           f"\"ranking\": true, or an output list ranked best first); stage {stage} needs them.")
    if not rows and kinds <= {"prompt"}:
        raise LLMTuneError(f"dataset {attr.name!r} has no answers; stage {stage} needs chosen/rejected pairs.")
    return rows, stats


def _encode_labelled(attr: DatasetAttr, examples: list[Example], enc: Encoder, stage: str, **_: Any
                     ) -> tuple[list, dict]:
    """Kind ``kto``: examples labelled desirable/undesirable (a pair gives one of each).

    Raises: LLMTuneError for data with neither labels nor pairs."""
    rows, stats, add = _collector()
    kinds = {ex.kind for ex in examples}
    items: list[Example] = []
    for ex in examples:
        if ex.kind == "kto":
            items.append(ex)
        elif ex.kind in ("pair", "ranked"):
            for k, resp in enumerate(ex.responses):
                items.append(Example(prompt=ex.prompt, responses=[resp], kind="kto", system=ex.system,
                                     tools=ex.tools, kto_tag=(k == 0)))
    if not items:
        raise LLMTuneError(f"dataset {attr.name!r} has no KTO labels (map a boolean column with "
                           "\"columns\": {\"kto_tag\": \"label\"}) and no chosen/rejected pairs; stage kto needs "
                           "desirable/undesirable examples.")
    if kinds & {"pair", "ranked"}:
        stats["notes"].append("preference rows split into one desirable and one undesirable KTO example each.")
    for i, ex in enumerate(items):
        add(enc.encode_kto(ex, items[(i + 1) % len(items)].responses[0]))
    return rows, stats


def _collector() -> tuple[list, dict, Callable[[Optional[dict]], None]]:
    """``(rows, stats, add)``: ``add(row)`` appends a row, or counts a dropped example for None."""
    rows: list = []
    stats: dict = {"dropped": 0, "notes": []}

    def add(row: Optional[dict]) -> None:
        if row is None:
            stats["dropped"] += 1
        else:
            rows.append(row)

    return rows, stats, add


@dataclass(frozen=True)
class DataKind:
    """What one kind of training data needs (a stage row names its kind: ``Stage.data``).

    Attributes:
        encode: ``(attr, examples, encoder, kind_name, *, mix_sft, packing, raw_rows) -> (rows, stats)``.
        packs_documents: documents are packed to ``cutoff_len`` unless ``packing: false`` is given (pt).
        packs_rows: encoded rows are packed after the split when ``packing``/``neat_packing`` (sft).
        mixes_sft: plain answers may join as ``sft_only`` rows with ``kto_alpha`` (the seed's dpo mix).
        keeps_columns: each row keeps its raw dataset columns (grpo's reward functions read them); images
            travel with the prompts.
    """

    encode: Callable[..., tuple[list, dict]]
    packs_documents: bool = False
    packs_rows: bool = False
    mixes_sft: bool = False
    keeps_columns: bool = False


#: data kind -> how it is encoded (module docstring: which data serves which kind)
DATA_KINDS: dict[str, DataKind] = {
    "pt": DataKind(_encode_text, packs_documents=True),
    "sft": DataKind(_encode_answers, packs_rows=True),
    "rm": DataKind(_encode_pairs),
    "ppo": DataKind(_encode_prompts),
    "dpo": DataKind(_encode_pairs, mixes_sft=True),
    "kto": DataKind(_encode_labelled),
    "grpo": DataKind(_encode_prompts, keeps_columns=True),
}
