"""``llmtune chat``: talk to a model (with its LoRA adapters) in the terminal.

``llmtune chat [config.yaml] --model_name_or_path M [--adapter_name_or_path A1,A2] [--template T]
[--device cuda:0] [--max_new_tokens 512] [--do_sample False] [--temperature T] [--top_p P] [--top_k K]
[--repetition_penalty R] [--system S] [--quantization_bit 4] [--infer_dtype bfloat16] [--images a.png,b.png]``

Keys are LLaMA-Factory's (parsed by :func:`llmtune.config.parse_config`), and so are the defaults (sampling
on, temperature 0.95, top_p 0.7, top_k 50, max_new_tokens 512); sampling is seeded with ``seed`` (default 42),
so a session is reproducible. At a terminal: ``User: `` prompts, the reply
streams after ``Assistant: ``, one conversation whose history ``/clear`` forgets; ``/exit`` (or end of
input) quits (``clear`` and ``exit`` too, as LLaMA-Factory). With piped stdin: one independent question per
line, each reply printed as ``Assistant: <reply>``, exit status 0 at the end; ``--history true`` makes the
lines one conversation. A reply cut by ``max_new_tokens`` ends in `` [...]`` (with a notice the first time).
Input must be UTF-8 (anything else is one error line). With a vision-language model (Qwen2/2.5/3-VL),
``--images`` go with the first message and ``/image PATH`` attaches an image to the next one
(:mod:`llmtune.chat_images`); a text-only model refuses both with one error line.

The template is ``--template``, else the one recorded by the llmtune run that wrote the adapter or model
folder (``template`` in its ``training_args.yaml``), else the model's own ``chat_template``. Replies end
at the tokenizer's eos ids or the template's end-of-turn ids (``<|im_end|>`` for ChatML).

Source: LLaMA-Factory's ``llamafactory-cli chat`` (command-line behaviour and key names).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, TextIO

import torch

from llmtune.chat_images import TEXT_ONLY, ChatImages, chat_images, check_image_file, pop_images_flag
from llmtune.errors import LLMTuneError, notice
from llmtune.engine import Engine, Request, TokenEvent
from llmtune.sampling import SamplingParams, check_generation_args
from llmtune.runs import load_model, recorded_template

__all__ = ["main", "ChatSession", "resolve_device", "recorded_template", "load_chat_model", "run_chat",
           "chat_stop_ids", "encode_chat_prompt", "reply_events", "stream_reply", "generate_reply"]

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
  --images a.png,b.png   images for the first message (vision-language models: Qwen2-VL, Qwen2.5-VL, Qwen3-VL)
Commands while chatting: `/clear` (forget the history), `/exit` (quit), `/image PATH` (attach to the next message).
A reply cut by --max_new_tokens ends in " [...]"."""


# ---------------------------------------------------------------------------------------------------
# chat helpers: prompt, stop ids, streamed reply (on the generation engine, llmtune.engine)
# ---------------------------------------------------------------------------------------------------
#: end-of-turn tokens of common chat formats, used only when no llmtune template is given and the
#: tokenizer's ``chat_template`` mentions them (ChatML, Llama 3, Phi-3, Gemma).
_KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _tokenizer_eos_ids(tokenizer: Any) -> list[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        ids = [getattr(tokenizer, "eos_token_id", None)]
    if isinstance(ids, int):
        ids = [ids]
    return [int(i) for i in ids if i is not None]


def chat_stop_ids(tokenizer: Any, template: Any = None) -> list[int]:
    """Token ids that end an assistant reply: the tokenizer's eos ids plus the template's end-of-turn ids.

    Args:
        tokenizer: an :class:`llmtune.tokenizer.Tokenizer` (uses ``eos_token_ids``, else ``eos_token_id``).
        template: an ``llmtune.data.templates`` template (uses ``stop_token_ids``) or ``None``; with
            ``None``, the end-of-turn tokens of known formats (``<|im_end|>``, ``<|eot_id|>``, ...) that
            appear in the tokenizer's ``chat_template`` are added.

    Returns:
        sorted list of distinct int ids (may be empty).
    """
    ids = set(_tokenizer_eos_ids(tokenizer))
    if template is not None:
        ids.update(int(i) for i in (getattr(template, "stop_token_ids", None) or []))
    else:
        chat_template = getattr(tokenizer, "chat_template", None) or ""
        if not isinstance(chat_template, str):
            chat_template = str(chat_template)
        for tok in _KNOWN_END_OF_TURN:
            if tok in chat_template:
                tid = tokenizer.convert_tokens_to_ids(tok)
                if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None):
                    ids.add(tid)
    return sorted(ids)


def encode_chat_prompt(tokenizer: Any, template: Any, messages: Sequence[dict],
                       system: Optional[str] = None, tools: Optional[Any] = None) -> list[int]:
    """Token ids of a chat prompt ending with the assistant header (ready for generation).

    Args:
        tokenizer: an :class:`llmtune.tokenizer.Tokenizer`.
        template: an ``llmtune.data.templates`` template (its ``encode_prompt(messages, system, tools)``)
            or ``None`` to render the tokenizer's own ``chat_template`` with ``add_generation_prompt=True``.
        messages: ``[{"role": "user"|"assistant"|"system", "content": str}, ...]`` ending with a user turn.
        system: a system prompt (overrides none given in ``messages``; ``None`` = the template default).
        tools: tool descriptions passed to the template (optional).

    Returns:
        list of int token ids.

    Raises:
        LLMTuneError: no template given and the tokenizer has no ``chat_template``.
    """
    from llmtune.errors import LLMTuneError

    messages = [dict(m) for m in messages]
    if template is not None:
        return list(template.encode_prompt(messages, system=system, tools=tools))
    if not getattr(tokenizer, "chat_template", None):
        raise LLMTuneError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no chat_template: "
            "pass --template (e.g. --template chatml, llama3, qwen)")
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}] + messages
    kw = {} if tools is None else {"tools": tools}
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
    return list(tokenizer.encode(text, add_special_tokens=False))


def reply_events(model: torch.nn.Module, prompt: Sequence[int], stop_ids: Sequence[int], **gen: Any
                 ) -> Iterator[TokenEvent]:
    """The engine's token events of one reply to ``prompt`` (list of int), the last one with its finish reason.

    Args:
        model: the model (:class:`llmtune.engine.Engine` requirements).
        prompt: the prompt's token ids; stop_ids: ids that end the reply.
        **gen: :func:`llmtune.generation.generate` settings: ``max_new_tokens`` (default 512), ``do_sample``,
            ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``generator``, ``adapter``,
            ``images`` (the prefill's ``pixel_values``/``image_grid_thw``: :attr:`llmtune.engine.Request.images`);
            ``pad_token_id`` is accepted and unused.

    Raises:
        LLMTuneError: an invalid setting (the key is named).
    """
    gen = dict(gen)
    gen.pop("pad_token_id", None)
    max_new = int(gen.pop("max_new_tokens", 512))
    generator, adapter, images = gen.pop("generator", None), gen.pop("adapter", None), gen.pop("images", None)
    params = SamplingParams(**gen)
    check_generation_args(max_new, **gen)
    if max_new == 0:
        return
    engine = Engine(model, max_slots=1, max_len=len(prompt) + max_new)
    engine.add_request(Request(list(prompt), max_new, params, list(stop_ids), generator, adapter=adapter,
                               images=images))
    for events in engine.iter_steps():
        yield from events


def _text_pieces(tokenizer: Any, events: Iterator[TokenEvent], stop: set, state: dict) -> Iterator[str]:
    """Decode a reply's tokens (stop token left out) into pieces of whole characters; ``state["finish"]``
    ends as the last event's finish reason (None when the events stop early)."""
    reply: list[int] = []
    emitted = ""
    state["finish"] = None
    for e in events:
        state["finish"] = e.finish_reason
        if e.token in stop:
            break
        reply.append(e.token)
        text = tokenizer.decode(reply, skip_special_tokens=True)
        # wait while the text ends in a partial character, or (rarely) is not prefix-stable
        if text.endswith("\ufffd") or not text.startswith(emitted):
            continue
        piece, emitted = text[len(emitted):], text
        if piece:
            yield piece
    text = tokenizer.decode(reply, skip_special_tokens=True)
    state["text"] = text
    if text.startswith(emitted) and len(text) > len(emitted):
        yield text[len(emitted):]


def stream_reply(model: torch.nn.Module, tokenizer: Any, template: Any, messages: Sequence[dict],
                 system: Optional[str] = None, tools: Optional[Any] = None, **gen: Any) -> Iterator[str]:
    """Generate the assistant's reply to a chat and yield its text piece by piece as tokens arrive.

    The prompt is :func:`encode_chat_prompt`; generation stops on :func:`chat_stop_ids` (the stop
    token is not part of the text). Pieces are yielded only when they decode to whole characters (a
    multi-byte character split across tokens waits for its last token), so ``"".join(pieces)`` equals
    ``tokenizer.decode(reply_ids, skip_special_tokens=True)``.

    Args:
        model, tokenizer, template, messages, system, tools: as :func:`encode_chat_prompt`.
        **gen: settings of :func:`reply_events` (``eos_token_ids`` overrides the stop ids).

    Yields:
        str pieces of the reply.
    """
    prompt = encode_chat_prompt(tokenizer, template, messages, system=system, tools=tools)
    stop = gen.pop("eos_token_ids", None)
    stop = chat_stop_ids(tokenizer, template) if stop is None else list(stop)
    yield from _text_pieces(tokenizer, reply_events(model, prompt, stop, **gen), set(stop), {})


def generate_reply(model: torch.nn.Module, tokenizer: Any, template: Any, messages: Sequence[dict],
                   system: Optional[str] = None, tools: Optional[Any] = None, **gen: Any) -> str:
    """The assistant's whole reply (str) to ``messages``; the non-streaming form of :func:`stream_reply`."""
    return "".join(stream_reply(model, tokenizer, template, messages, system=system, tools=tools, **gen))


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
        vision: the model's :class:`~llmtune.chat_images.ChatImages` (None: a text-only model, images refused).
        **gen: :func:`reply_events` settings (``max_new_tokens``, ``do_sample``,
            ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``generator``).

    ``history`` is a list of ``{"role", "content"}`` dicts (user and assistant turns; a user turn with images
    also has ``"images"``, its image paths); ``pending`` the image paths that go with the next message.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, template: Any = None, system: Optional[str] = None,
                 max_context: Optional[int] = None, vision: Optional[ChatImages] = None, **gen: Any) -> None:
        self.vision, self.pending = vision, []
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.system = system
        self.max_context = max_context
        self.gen = gen
        self.history: list[dict] = []
        self.stop_ids = chat_stop_ids(tokenizer, template)
        #: True when the last reply was cut by ``max_new_tokens`` (no stop token came)
        self.truncated = False

    def clear(self, keep_images: bool = False) -> None:
        """Forget the history (and the images waiting for the next message unless ``keep_images``)."""
        self.history = []
        self.pending = self.pending if keep_images else []

    def attach(self, path: str) -> None:
        """Attach the image file ``path`` to the next message (``/image PATH``).

        Raises: LLMTuneError: a text-only model, or a missing or unreadable file (the path is named)."""
        path = path.strip().strip("\"'")
        if self.vision is None:
            raise LLMTuneError(f"/image {path}: this model {TEXT_ONLY}")
        self.pending.append(check_image_file(path, "/image"))

    def _encode(self, messages: list[dict]) -> tuple[list[int], list]:
        """The prompt ids of ``messages`` (their images' placeholders expanded) and the images in order."""
        images: list = []
        if self.vision is not None:
            messages, images = self.vision.expand(messages)
        return encode_chat_prompt(self.tokenizer, self.template, messages, system=self.system), images

    def _fit(self, messages: list[dict]) -> list[dict]:
        """The latest turns of ``messages`` that fit :attr:`max_context` prompt tokens (older turns dropped,
        then the system prompt and the last message cut to their latest tokens), with one notice each.

        Raises: LLMTuneError when even an empty message does not fit (the template's own tokens)."""
        if not self.max_context:
            return messages
        limit, dropped = self.max_context, False

        def size(msgs: list[dict]) -> int:
            return len(self._encode(msgs)[0])

        # a cheap bound first: text of many times the limit's characters cannot fit (a 4 MB paste)
        cap = 16 * limit + 1024
        if self.system is not None and len(self.system) > cap:
            self.system = self.system[-cap:]
        messages = [dict(m, content=m["content"][-cap:]) if len(m.get("content") or "") > cap else m
                    for m in messages]
        while len(messages) > 1 and size(messages) > limit:
            messages = messages[2:] if len(messages) > 2 else messages[1:]
            dropped = True
        if dropped:
            notice(f"the conversation is longer than cutoff_len ({limit} tokens): "
                   "the oldest turns were dropped (type `/clear` to start afresh)")
        if self.system and size(messages) > limit:
            self.system = self._cut_text(self.system, size(messages) - limit)
            notice(f"the system prompt is longer than cutoff_len ({limit} tokens): only its end is kept")
        over = size(messages) - limit
        if over > 0:
            last = messages[-1]
            messages = messages[:-1] + [dict(last, content=self._cut_text(last["content"], over))]
            notice(f"the message is longer than cutoff_len ({limit} tokens): only its last part is answered "
                   "(raise --cutoff_len, within the model's max_position_embeddings, for longer messages)")
            if size(messages) > limit:
                raise LLMTuneError(f"cutoff_len {limit} is smaller than the chat template's own tokens "
                                   f"({size([dict(last, content='')])}); raise --cutoff_len")
        return messages

    def _cut_text(self, text: str, over: int) -> str:
        """``text`` without its first tokens: ``over`` tokens too many, plus a margin for re-tokenization."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.decode(ids[min(len(ids), over + 2):], skip_special_tokens=False)

    def stream(self, query: str) -> Iterator[str]:
        """Answer ``query`` (str) given the history; yield the reply's text pieces; record both turns.

        Pieces are yielded once they decode to whole characters, so ``"".join(pieces)`` is
        ``tokenizer.decode(reply_ids, skip_special_tokens=True)`` (as :func:`stream_reply`).
        Afterwards :attr:`truncated` says whether ``max_new_tokens`` ended the reply (no stop token came).
        """
        turn = dict(role="user", content=query, **({"images": self.pending} if self.pending else {}))
        messages = self._fit(self.history + [turn])
        prompt, images = self._encode(messages)
        vision = {"images": self.vision.inputs(images)} if images else {}
        self.pending = []
        state: dict = {}
        yield from _text_pieces(self.tokenizer, reply_events(self.model, prompt, self.stop_ids, **self.gen, **vision),
                                set(self.stop_ids), state)
        self.truncated = state["finish"] != "stop"
        text = state["text"]
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


def _drop_typed_ahead(stdin: TextIO) -> None:
    """Discard what was typed at a terminal while a reply streamed (it would otherwise become the next
    question, mixed with the reply on screen); a no-op for pipes and files."""
    try:
        import termios

        if stdin.isatty():
            termios.tcflush(stdin.fileno(), termios.TCIFLUSH)
    except (ImportError, OSError, ValueError, AttributeError):
        pass


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
        if query == "/image" or query.startswith("/image "):
            try:
                session.attach(query[len("/image"):].strip() or "(no path given: /image PATH)")
            except LLMTuneError as e:
                if not interactive:
                    raise
                print(f"Error: {e}", file=sys.stderr, flush=True)
                continue
            if interactive:
                print("Image attached to your next message.", file=stdout, flush=True)
            continue
        if not keep:
            session.clear(keep_images=True)
        print("Assistant: ", end="", file=stdout, flush=True)
        try:
            for piece in session.stream(query):
                stdout.write(piece)
                if interactive:
                    stdout.flush()
        except KeyboardInterrupt:
            if not interactive:
                raise
            print(" [stopped]", file=stdout, flush=True)   # Ctrl-C stops the reply; a second one at the prompt quits
            _drop_typed_ahead(stdin)
            continue
        if session.truncated:
            stdout.write(TRUNCATED_MARK)
        print(file=stdout, flush=True)
        if interactive:
            _drop_typed_ahead(stdin)
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
    argv, images = pop_images_flag(argv)
    images = [check_image_file(p, "--images") for p in images]   # before the model loads
    cfg = parse_config(argv, command="chat")
    gen: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                               temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                               repetition_penalty=cfg.repetition_penalty)
    check_generation_args(**gen)  # a bad --temperature etc. fails before the model loads
    if sys.stdin.isatty():   # at a terminal, say what the wait is for (loading takes a while on a CPU)
        print(f"llmtune chat: loading {cfg.model_name_or_path}"
              + (f" with adapter(s) {cfg.adapter_name_or_path}" if cfg.adapter_name_or_path else "") + " ...",
              file=sys.stderr, flush=True)
    model, tokenizer, template = load_chat_model(cfg)
    if cfg.do_sample:  # seeded (``seed``, default 42): the same question gets the same answer
        gen["generator"] = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    system = cfg.system if cfg.system is not None else cfg.default_system
    limit = getattr(model.config, "max_position_embeddings", None)
    max_context = cfg.cutoff_len if not limit else max(1, min(cfg.cutoff_len, limit - cfg.max_new_tokens))
    vision = chat_images(cfg, model, tokenizer)
    if images and vision is None:
        raise LLMTuneError(f"--images: the model {cfg.model_name_or_path} {TEXT_ONLY}")
    session = ChatSession(model, tokenizer, template, system=system, max_context=max_context, vision=vision, **gen)
    session.pending = images
    stdin = sys.stdin
    if hasattr(stdin, "reconfigure"):  # UTF-8 whatever the locale; undecodable bytes raise, not mojibake
        stdin.reconfigure(encoding="utf-8", errors="strict")
    try:
        return run_chat(session, stdin, sys.stdout, history=bool(cfg.history))
    except KeyboardInterrupt:
        print(file=sys.stdout, flush=True)
        return 0
