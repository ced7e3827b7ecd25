"""Encode internal examples into token rows for each stage (formats in docs/internals.md).

Masking: prompt tokens get label -100 (unless ``train_on_prompt``), every assistant turn of a conversation is
trained (only the last one with ``mask_history``), and each response keeps its end-of-turn token (the
template's ``stop_token_ids[0]``), which is trained. The trained tokens of a turn are exactly the answer and
its end-of-turn token: text a template writes after that token (ChatML's ``"\n"``) belongs to the next
prompt (label -100) and is left out after the last turn, so every sequence ends with the stop token.

Truncation to ``cutoff_len`` (per turn, in order; the last turn first with ``mask_history``): the budget is
split between a turn's prompt and response by LLaMA-Factory's rule (``infer_seqlen``: a response shorter than
half the budget is kept whole, else a prompt shorter than half is kept whole, else both shrink in proportion).
A cut prompt keeps its *end* (so it still ends with the assistant header); a cut response keeps its
beginning plus its end-of-turn tail (the end-of-turn token and what the template writes after it), so a
truncated answer still ends with the stop token. Examples longer than ``cutoff_len`` are counted and reported
in one notice per dataset; none is dropped silently (only examples left with no trained token are dropped,
and counted).
"""

from __future__ import annotations

from typing import Optional

from llmtune.constants import IGNORE_INDEX
from llmtune.data.formats import Example



def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """Lengths ``(prompt, response)`` to keep so that their sum fits ``cutoff_len``.

    Rule (LLaMA-Factory ``processor_utils.infer_seqlen``): if ``2 * target < cutoff`` the response may take
    the whole budget; elif ``2 * source < cutoff`` it takes ``cutoff - source``; else
    ``int(cutoff * target / (source + target))``. The prompt gets what is left.
    """
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / max(1, source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def cut_prompt(ids: list[int], n: int) -> list[int]:
    """Keep the last ``n`` tokens of a prompt (its end holds the assistant header)."""
    return ids[len(ids) - n:] if n > 0 else []


def cut_response(ids: list[int], n: int, stop_ids: list[int]) -> list[int]:
    """Keep ``n`` tokens of a response: its head plus its end-of-turn tail (from the last stop token on).

    ``ids`` is ``list[int]``; ``stop_ids`` the template's end-of-turn ids."""
    if n >= len(ids):
        return list(ids)
    if n <= 0:
        return []
    stops = set(stop_ids)
    pos = next((i for i in range(len(ids) - 1, -1, -1) if ids[i] in stops), None)
    if pos is None:
        return ids[:n]
    tail = ids[pos:] if len(ids) - pos < n else ids[pos:pos + 1]
    return ids[:n - len(tail)] + tail


class Encoder:
    """Stage encoders bound to a template and the options (``cutoff_len``, ``train_on_prompt``, ...).

    Every ``encode_*`` returns a row dict of lists of ints, or None when nothing is left to train on.
    ``self.truncated`` counts examples longer than ``cutoff_len``.
    """

    def __init__(self, template, tokenizer, cutoff_len: int, train_on_prompt: bool = False,
                 mask_history: bool = False) -> None:   # cutoff_len: the config's (default in llmtune.config)
        self.template = template
        self.tokenizer = tokenizer
        self.cutoff_len = int(cutoff_len)
        self.train_on_prompt = train_on_prompt
        self.mask_history = mask_history
        self.stop_ids = list(template.stop_token_ids)
        self.truncated = 0

    def _turns(self, ex: Example, response: dict):
        """Template turns, each response ending exactly at its end-of-turn token: what a template writes after
        it (ChatML's ``"\\n"``) is moved to the next prompt (untrained), and dropped after the last turn."""
        pairs = self.template.encode_turns(list(ex.prompt) + [response], ex.system or None, ex.tools or None)
        stops = set(self.stop_ids)
        out, carry = [], []
        for src, tgt in pairs:
            pos = next((i for i in range(len(tgt) - 1, -1, -1) if tgt[i] in stops), None)
            rest = [] if pos is None else tgt[pos + 1:]
            tgt = tgt if pos is None else tgt[:pos + 1]
            out.append((carry + src, tgt))
            carry = rest
        return out

    def encode_sft(self, ex: Example, response: Optional[dict] = None) -> Optional[dict]:
        """``input_ids, attention_mask, labels`` of a conversation (``response`` overrides the last answer)."""
        pairs = self._turns(ex, response or ex.responses[0])
        if sum(len(p) + len(r) for p, r in pairs) > self.cutoff_len:
            self.truncated += 1
        n = len(pairs)
        order = range(n - 1, -1, -1) if self.mask_history else range(n)
        kept, total = {}, 0
        for k in order:
            if total >= self.cutoff_len:
                break
            src, tgt = pairs[k]
            s, t = infer_seqlen(len(src), len(tgt), self.cutoff_len - total)
            src, tgt = cut_prompt(src, s), cut_response(tgt, t, self.stop_ids)
            total += len(src) + len(tgt)
            kept[k] = (src, tgt)
        ids, labels = [], []
        for k in sorted(kept):
            src, tgt = kept[k]
            trained = (not self.mask_history) or k == n - 1
            ids += src + tgt
            labels += (src if self.train_on_prompt else [IGNORE_INDEX] * len(src))
            labels += tgt if trained else [IGNORE_INDEX] * len(tgt)
        if all(x == IGNORE_INDEX for x in labels):
            return None
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def _prompt_and(self, ex: Example, responses: list[dict]) -> tuple[list[int], list[list[int]]]:
        prompt_ids, outs = None, []
        for resp in responses:
            pairs = self._turns(ex, resp)
            p = [t for a, b in pairs[:-1] for t in a + b] + pairs[-1][0]
            prompt_ids = p if prompt_ids is None else prompt_ids
            outs.append(pairs[-1][1])
        return prompt_ids, outs

    def encode_pair(self, ex: Example, chosen: dict, rejected: dict) -> Optional[dict]:
        """``chosen_*``/``rejected_*`` rows sharing one prompt (prompt labels -100)."""
        prompt, (c, r) = self._prompt_and(ex, [chosen, rejected])
        if len(prompt) + max(len(c), len(r)) > self.cutoff_len:
            self.truncated += 1
        s, t = infer_seqlen(len(prompt), max(len(c), len(r)), self.cutoff_len)
        prompt = cut_prompt(prompt, s)
        c, r = cut_response(c, t, self.stop_ids), cut_response(r, t, self.stop_ids)
        if not c or not r:
            return None
        row = {}
        for key, resp in (("chosen", c), ("rejected", r)):
            row[f"{key}_input_ids"] = prompt + resp
            row[f"{key}_attention_mask"] = [1] * (len(prompt) + len(resp))
            row[f"{key}_labels"] = [IGNORE_INDEX] * len(prompt) + resp
        return row

    def _single(self, ex: Example, resp: dict) -> tuple[list[int], list[int], bool]:
        prompt, (r,) = self._prompt_and(ex, [resp])
        long = len(prompt) + len(r) > self.cutoff_len
        s, t = infer_seqlen(len(prompt), len(r), self.cutoff_len)
        prompt, r = cut_prompt(prompt, s), cut_response(r, t, self.stop_ids)
        return prompt + r, [IGNORE_INDEX] * len(prompt) + r, long

    def encode_kto(self, ex: Example, kl_response: dict) -> Optional[dict]:
        """KTO row: the completion, a mismatched completion ``kl_*`` (same prompt, another example's
        response; KL reference point of Ethayarajh et al. 2024, as in TRL) and ``kto_tag``."""
        ids, labels, long = self._single(ex, ex.responses[0])
        kl_ids, kl_labels, _ = self._single(ex, kl_response)
        self.truncated += int(long)
        if all(x == IGNORE_INDEX for x in labels):
            return None
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
                "kl_input_ids": kl_ids, "kl_attention_mask": [1] * len(kl_ids), "kl_labels": kl_labels,
                "kto_tag": bool(ex.kto_tag)}

    def encode_ppo(self, ex: Example) -> Optional[dict]:
        """Prompt-only row (ends with the assistant header) for generation: ``input_ids, attention_mask``."""
        ids = self.template.encode_prompt(ex.prompt, ex.system or None, ex.tools or None)
        if len(ids) > self.cutoff_len:
            self.truncated += 1
            ids = cut_prompt(ids, self.cutoff_len)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def encode_pretrain(self, texts: list[str], packing: bool = True) -> list[dict]:
        """Documents joined with eos and cut into ``cutoff_len`` blocks (the last block may be shorter);
        ``labels = input_ids``. ``packing=False``: one row per document (with its eos), cut at ``cutoff_len``."""
        eos = self.tokenizer.eos_token_id
        eos = eos if eos is not None else self.stop_ids[0]
        stream: list[int] = []
        rows = []
        for text in texts:
            if text and not packing:
                doc = (self.tokenizer.encode(text, add_special_tokens=False) + [eos])[:self.cutoff_len]
                rows.append({"input_ids": doc, "attention_mask": [1] * len(doc), "labels": list(doc)})
            elif text:
                stream += self.tokenizer.encode(text, add_special_tokens=False) + [eos]
        for i in range(0, len(stream), self.cutoff_len):
            block = stream[i:i + self.cutoff_len]
            rows.append({"input_ids": block, "attention_mask": [1] * len(block), "labels": list(block)})
        return rows


def pack_rows(rows: list[dict], cutoff_len: int, neat: bool = True) -> list[dict]:
    """Pack sft rows into rows of at most ``cutoff_len`` tokens (first-fit decreasing).

    ``neat=True`` (LLaMA-Factory's ``neat_packing``): the packed ``attention_mask`` holds segment ids 1, 2, 3, ...
    (the model never attends across segments, see ``Transformer.forward``) and ``position_ids`` restart at 0 in
    each segment. ``neat=False`` (``packing`` alone, as LLaMA-Factory): one sequence, ``attention_mask`` all 1
    and ``position_ids`` 0..n-1, so later examples attend to earlier ones. Either way the first label of every
    segment is -100 (it would be predicted from the previous segment).
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        for b in range(len(bins)):
            if space[b] >= n:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(cutoff_len - n)
    packed = []
    for members in bins:
        out = {"input_ids": [], "attention_mask": [], "labels": [], "position_ids": []}
        for seg, i in enumerate(sorted(members), 1):
            r = rows[i]
            n = len(r["input_ids"])
            out["input_ids"] += r["input_ids"]
            start = len(out["position_ids"])
            out["attention_mask"] += [seg if neat else 1] * n
            out["labels"] += [IGNORE_INDEX] + list(r["labels"][1:])
            out["position_ids"] += list(range(n)) if neat else list(range(start, start + n))
            if r.get("images"):   # vision-language rows: the images, in segment order
                out.setdefault("images", []).extend(r["images"])
        packed.append(out)
    return packed
