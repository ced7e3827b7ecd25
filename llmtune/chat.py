"""``llmtune chat``: talk to a model (with its LoRA adapters) in the terminal.

``llmtune chat [config.yaml] --model_name_or_path M [--adapter_name_or_path A1,A2] [--template T]
[--device cuda:0] [--max_new_tokens 512] [--do_sample False] [--temperature T] [--top_p P] [--top_k K]
[--repetition_penalty R] [--system S] [--quantization_bit 4] [--infer_dtype bfloat16]``

Keys are LLaMA-Factory's (parsed by :func:`llmtune.config.parse_config`), and so are the defaults (sampling
on, temperature 0.95, top_p 0.7, top_k 50, max_new_tokens 512); sampling is seeded with ``seed`` (default 42),
so a session is reproducible. At a terminal: ``User: `` prompts, the reply
streams after ``Assistant: ``, one conversation whose history ``/clear`` forgets; ``/exit`` (or end of
input) quits (``clear`` and ``exit`` too, as LLaMA-Factory). With piped stdin: one independent question per
line, each reply printed as ``Assistant: <reply>``, exit status 0 at the end; ``--history true`` makes the
lines one conversation. A reply cut by ``max_new_tokens`` ends in `` [...]`` (with a notice the first time).
Input must be UTF-8 (anything else is one error line).

The template is ``--template``, else the one recorded by the llmtune run that wrote the adapter or model
folder (``template`` in its ``training_args.yaml``), else the model's own ``chat_template``. Replies end
at the tokenizer's eos ids or the template's end-of-turn ids (``<|im_end|>`` for ChatML).

Source: LLaMA-Factory's ``llamafactory-cli chat`` (command-line behaviour and key names).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

import torch

from llmtune.errors import LLMTuneError, notice
from llmtune.generation import chat_stop_ids, check_generation_args, encode_chat_prompt, generate_steps
from llmtune.runs import load_model, recorded_template

__all__ = ["main", "ChatSession", "resolve_device", "recorded_template", "load_chat_model", "run_chat"]

WELCOME = "Welcome to llmtune chat. Type `/clear` to forget the history, `/exit` to quit."

#: appended to a reply that ``max_new_tokens`` cut before the model ended it
TRUNCATED_MARK = " [...]"

_CLEAR = ("/clear", "clear")
_EXIT = ("/exit", "exit", "/quit")

USAGE = """usage: llmtune chat [config.yaml] --model_name_or_path PATH [--key value ...]

Chat with a model in the terminal; with piped stdin, each line is an independent question.
  --model_name_or_path   local folder, Hugging Face Hub id, .gguf file or an llmtune output folder
  --adapter_name_or_path LoRA adapter folder(s), comma-separated, applied in order
  --finetuning_type      lora (default), freeze or full
  --template             chat template name (default: the one recorded by training, else the model's own)
  --quantization_bit 4   load the base weights as NF4
  --infer_dtype          auto, float32, bfloat16, float16
  --device               cpu, cuda, cuda:0, ... (falls back to the CPU with a notice if absent)
  --max_new_tokens 512  --do_sample True  --temperature 0.95  --top_p 0.7  --top_k 50
  --repetition_penalty 1.0  --system "You are ..."
  --history true         piped lines are one conversation (default: each line is answered on its own)
Commands while chatting: `/clear` (forget the history), `/exit` (quit).
A reply cut by --max_new_tokens ends in " [...]"."""


# ---------------------------------------------------------------------------------------------------
# setup helpers
# ---------------------------------------------------------------------------------------------------
def resolve_device(spec: Optional[str]) -> torch.device:
    """The torch device to chat on.

    Args:
        spec: ``None`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``...

    Returns:
        the device; a device that does not exist here (``cuda:0`` on a CPU machine, ``cuda:3`` with two
        GPUs) gives a one-line notice and the CPU.

    Raises:
        LLMTuneError: ``spec`` is not a device name torch understands.
    """
    if spec is None or str(spec).strip() == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(spec).strip())
    except (RuntimeError, ValueError):
        raise LLMTuneError(f"--device {spec!r} is not a device name; use cpu, cuda, cuda:0, ...") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n and (dev.index is None or dev.index < n):
            return dev
        where = "no CUDA device here" if n == 0 else f"only {n} CUDA device(s) here"
        notice(f"--device {spec}: {where}; using the CPU")
        return torch.device("cpu")
    if dev.type == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return dev
    notice(f"--device {spec}: not available here; using the CPU")
    return torch.device("cpu")


def _split_adapters(value: Optional[str]) -> list[str]:
    if not value:
        return []
    return [a.strip() for a in str(value).split(",") if a.strip()]


def _has_tokenizer(folder: str) -> bool:
    p = Path(folder)
    return p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


_DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def load_chat_model(cfg: Any) -> tuple[torch.nn.Module, Any, Any]:
    """Load ``(model, tokenizer, template)`` for chatting from a chat config.

    Args:
        cfg: an :class:`llmtune.config.TrainConfig` (``model_name_or_path``, ``adapter_name_or_path``,
            ``finetuning_type``, ``template``, ``quantization_bit``/``quantization_type``/
            ``double_quantization``, ``infer_dtype``, ``device``).

    Returns:
        the model (eval mode, on the resolved device, adapters merged), the tokenizer (from the last
        adapter folder when it holds tokenizer files, else from the model) and the template
        (``llmtune.data.templates.get_template``: ``--template``, else the recorded one, else the model's
        own ``chat_template``).

    Raises:
        LLMTuneError: adapters with ``finetuning_type`` other than lora, or any loading error.
    """
    from llmtune.data.templates import get_template
    from llmtune.tokenizer import load_tokenizer

    adapters = _split_adapters(cfg.adapter_name_or_path)
    if adapters and cfg.finetuning_type != "lora":
        raise LLMTuneError(f"--adapter_name_or_path needs --finetuning_type lora (got {cfg.finetuning_type!r}); "
                           "a full or freeze fine-tune is loaded with --model_name_or_path <its output folder>")
    device = resolve_device(cfg.device)
    dtype = _DTYPES[cfg.infer_dtype]
    if dtype == "float16" and device.type == "cpu":
        notice("--infer_dtype float16: float16 arithmetic is very slow on the CPU; using float32")
        dtype = "float32"
    kw: dict[str, Any] = dict(dtype=dtype, device=str(device))
    if adapters:
        kw["adapter_name_or_path"] = ",".join(adapters)
    if cfg.quantization_bit is not None:
        kw.update(quantization_bit=cfg.quantization_bit, quantization_type=cfg.quantization_type,
                  double_quantization=cfg.double_quantization)
    model = load_model(cfg.model_name_or_path, **kw)
    model.eval()
    tok_source = adapters[-1] if adapters and _has_tokenizer(adapters[-1]) else cfg.model_name_or_path
    tokenizer = load_tokenizer(tok_source)
    name = cfg.template or recorded_template(*reversed(model.adapter_chain.parents), cfg.model_name_or_path)
    template = get_template(name, tokenizer)
    return model, tokenizer, template


# ---------------------------------------------------------------------------------------------------
# the conversation
# ---------------------------------------------------------------------------------------------------
class ChatSession:
    """A conversation with a model: the history plus the generation settings.

    Args:
        model: a :class:`llmtune.models.transformer.Transformer` (eval mode).
        tokenizer: an :class:`llmtune.tokenizer.Tokenizer`.
        template: an ``llmtune.data.templates`` template or ``None`` (the tokenizer's ``chat_template``).
        system: the system prompt (``None``: the template's default).
        max_context: the most prompt tokens (``cutoff_len``); older turns are dropped, with a notice, to fit.
        **gen: :func:`llmtune.generation.generate` settings (``max_new_tokens``, ``do_sample``,
            ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``generator``).

    ``history`` is a list of ``{"role", "content"}`` dicts (user and assistant turns).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, template: Any = None, system: Optional[str] = None,
                 max_context: Optional[int] = None, **gen: Any) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.system = system
        self.max_context = max_context
        self.gen = gen
        self.history: list[dict] = []
        self.stop_ids = chat_stop_ids(tokenizer, template)
        #: True when the last reply was cut by ``max_new_tokens`` (no stop token came)
        self.truncated = False

    def clear(self) -> None:
        """Forget the history."""
        self.history = []

    def _fit(self, messages: list[dict]) -> list[dict]:
        if not self.max_context:
            return messages
        dropped = False
        while len(messages) > 1:
            n = len(encode_chat_prompt(self.tokenizer, self.template, messages, system=self.system))
            if n <= self.max_context:
                break
            messages = messages[2:] if len(messages) > 2 else messages[1:]
            dropped = True
        if dropped:
            notice(f"the conversation is longer than cutoff_len ({self.max_context} tokens): "
                   "the oldest turns were dropped (type `clear` to start afresh)")
        return messages

    def stream(self, query: str) -> Iterator[str]:
        """Answer ``query`` (str) given the history; yield the reply's text pieces; record both turns.

        Pieces are yielded once they decode to whole characters, so ``"".join(pieces)`` is
        ``tokenizer.decode(reply_ids, skip_special_tokens=True)`` (as :func:`llmtune.generation.stream_reply`).
        Afterwards :attr:`truncated` says whether ``max_new_tokens`` ended the reply (no stop token came).
        """
        messages = self._fit(self.history + [{"role": "user", "content": query}])
        prompt = encode_chat_prompt(self.tokenizer, self.template, messages, system=self.system)
        gen = dict(self.gen)
        gen.setdefault("pad_token_id", self.stop_ids[0] if self.stop_ids else 0)
        stop = set(self.stop_ids)
        reply: list[int] = []
        emitted = ""
        self.truncated = True
        for tokens, alive in generate_steps(self.model, torch.tensor([prompt], dtype=torch.long),
                                            eos_token_ids=self.stop_ids, **gen):
            tid = int(tokens[0])
            if not bool(alive[0]) or tid in stop:
                self.truncated = False
                break
            reply.append(tid)
            text = self.tokenizer.decode(reply, skip_special_tokens=True)
            if text.endswith("\ufffd") or not text.startswith(emitted):  # a partial character: wait
                continue
            piece, emitted = text[len(emitted):], text
            if piece:
                yield piece
        text = self.tokenizer.decode(reply, skip_special_tokens=True)
        if text.startswith(emitted) and len(text) > len(emitted):
            yield text[len(emitted):]
        self.history = messages + [{"role": "assistant", "content": text}]

    def reply(self, query: str) -> str:
        """The whole reply (str) to ``query``; see :meth:`stream`."""
        return "".join(self.stream(query))


def _read_line(stdin: TextIO, lineno: int = 0) -> str:
    """One line of ``stdin``; bytes that are not UTF-8 (or, under a C/POSIX locale, the lone surrogates
    Python decodes them to) raise one :class:`LLMTuneError` naming the line."""
    try:
        line = stdin.readline()
    except UnicodeDecodeError as e:
        raise LLMTuneError(f"stdin is not UTF-8 text (line {lineno}: byte {e.object[e.start:e.start + 4]!r} "
                           "cannot be decoded); convert the input first, e.g. `iconv -f latin1 -t utf-8 file | "
                           "llmtune chat ...`") from None
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        raise LLMTuneError(f"stdin is not UTF-8 text (line {lineno}: an undecodable byte); convert the "
                           "input first, e.g. `iconv -f latin1 -t utf-8 file | llmtune chat ...`") from None
    return line


def run_chat(session: ChatSession, stdin: TextIO, stdout: TextIO, interactive: Optional[bool] = None,
             history: bool = False) -> int:
    """The chat loop; returns the exit status (0).

    Args:
        session: the :class:`ChatSession` that answers.
        stdin, stdout: text streams (``stdin`` decoded as UTF-8 by :func:`main`).
        interactive: a terminal session (``None``: ``stdin.isatty()``). Interactive: print the welcome line,
            prompt ``User: ``, stream the reply after ``Assistant: ``, keep one conversation; ``/clear``
            (or ``clear``) resets it, ``/exit`` (or ``exit``, or end of input) quits. Otherwise one question
            per line of ``stdin`` (empty lines skipped, the commands honoured), each reply printed as
            ``Assistant: <reply>``.
        history: piped lines share one conversation (``--history``); by default each is answered alone.

    A reply cut by ``max_new_tokens`` is printed with :data:`TRUNCATED_MARK` after it, and the first such
    reply gives a notice on stderr.

    Raises:
        LLMTuneError: ``stdin`` holds bytes that are not UTF-8.
    """
    if interactive is None:
        interactive = stdin.isatty()
    keep = interactive or history
    warned = False
    if interactive:
        print(WELCOME, file=stdout, flush=True)
    lineno = 0
    while True:
        if interactive:
            print("\nUser: ", end="", file=stdout, flush=True)
        lineno += 1
        line = _read_line(stdin, lineno)
        if not line:
            if interactive:
                print(file=stdout, flush=True)
            return 0
        query = line.strip()
        if not query:
            continue
        if query in _EXIT:
            return 0
        if query in _CLEAR:
            session.clear()
            if interactive:
                print("History has been removed.", file=stdout, flush=True)
            continue
        if not keep:
            session.clear()
        print("Assistant: ", end="", file=stdout, flush=True)
        for piece in session.stream(query):
            stdout.write(piece)
            if interactive:
                stdout.flush()
        if session.truncated:
            stdout.write(TRUNCATED_MARK)
        print(file=stdout, flush=True)
        if session.truncated and not warned:
            warned = True
            notice(f"a reply reached max_new_tokens ({session.gen.get('max_new_tokens')}) and was cut "
                   f"(marked{TRUNCATED_MARK}); raise --max_new_tokens for longer replies")


def main(argv: list[str]) -> int:
    """``llmtune chat`` entry point (called by :mod:`llmtune.cli`); returns the exit status.

    Raises:
        LLMTuneError: a bad flag or value, a missing model, or a loading error (the CLI prints one line).
    """
    from llmtune.config import parse_config

    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    cfg = parse_config(argv, command="chat")
    gen: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                               temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                               repetition_penalty=cfg.repetition_penalty)
    check_generation_args(**gen)  # a bad --temperature etc. fails before the model loads
    model, tokenizer, template = load_chat_model(cfg)
    if cfg.do_sample:  # seeded (``seed``, default 42): the same question gets the same answer
        gen["generator"] = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    system = cfg.system if cfg.system is not None else cfg.default_system
    session = ChatSession(model, tokenizer, template, system=system, max_context=cfg.cutoff_len, **gen)
    stdin = sys.stdin
    if hasattr(stdin, "reconfigure"):  # UTF-8 whatever the locale; undecodable bytes raise, not mojibake
        stdin.reconfigure(encoding="utf-8", errors="strict")
    try:
        return run_chat(session, stdin, sys.stdout, history=bool(cfg.history))
    except KeyboardInterrupt:
        print(file=sys.stdout, flush=True)
        return 0
