"""Chat templates rendered in jinja2's sandbox, bounded in time and size, as transformers renders them.

A model's own ``chat_template`` is untrusted text from a downloaded folder: it is compiled in jinja2's
``ImmutableSandboxedEnvironment`` (``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension, a
``tojson`` filter without HTML escaping, ``raise_exception(msg)``, ``strftime_now(fmt)``: transformers'
``_compile_jinja_template``), with ``include``/``import``/``extends`` refused and every call, attribute and item
access checked against a deadline and an output size (:func:`render_bounded`).

Used by :meth:`llmtune.tokenizer.Tokenizer.apply_chat_template`; nothing here knows tokenizers.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

from llmtune.errors import LLMTuneError

#: limits of one chat-template rendering (a real template renders a conversation in milliseconds)
RENDER_SECONDS = 5.0
RENDER_MAX_CHARS = 8_000_000
RENDER_MAX_RANGE = 100_000


class TemplateLimitError(Exception):
    """A chat template ran past :data:`RENDER_SECONDS` or :data:`RENDER_MAX_CHARS`, or used a refused feature."""


_render_state = threading.local()


def _tick() -> None:
    deadline = getattr(_render_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimitError(f"rendering took over {getattr(_render_state, 'seconds', RENDER_SECONDS):g} s "
                                 "(a loop that does not end?)")


def _bounded_env_class():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """jinja2's immutable sandbox plus a deadline checked on every call, attribute and item access and
        loop step over ``range``, a size cap on ``*`` / ``**`` results and on ``range``."""

        intercepted_binops = frozenset(["*", "**"])

        def call(self, __context, __obj, *args, **kwargs):  # noqa: N807 - jinja2's signature
            _tick()
            _check_call_size(__obj, args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj, attribute):
            _tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _tick()
            return super().getitem(obj, argument)

        def call_binop(self, context, operator, left, right):
            _tick()
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise TemplateLimitError(f"the power {left!r} ** {right!r} is too large")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > RENDER_MAX_CHARS:
                        raise TemplateLimitError(f"a repeated sequence of {len(seq) * n} items is too large")
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox


#: str methods whose first argument is the width of the result (``'x'.ljust(4000000000)`` would allocate 4 GB)
_WIDTH_METHODS = ("ljust", "rjust", "center", "zfill", "expandtabs")


def _check_call_size(obj: Any, args: tuple, kwargs: dict) -> None:
    """Refuse a str method call whose result would exceed :data:`RENDER_MAX_CHARS` before it allocates:
    padding to a width, ``replace`` that multiplies the text, ``join`` of a long repeated sequence."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if not isinstance(owner, str):
        return
    if name in _WIDTH_METHODS:
        width = args[0] if args else kwargs.get("width", kwargs.get("tabsize", 0))
        if isinstance(width, int) and (width if name != "expandtabs" else width * len(owner)) > RENDER_MAX_CHARS:
            raise TemplateLimitError(f"str.{name}({width}) would build a text over {RENDER_MAX_CHARS} characters")
    elif name == "replace" and len(args) >= 2 and isinstance(args[1], str):
        grow = max(1, len(args[1])) * (len(owner) + 1) + len(owner)
        if grow > RENDER_MAX_CHARS and owner.count(args[0]) * len(args[1]) + len(owner) > RENDER_MAX_CHARS:
            raise TemplateLimitError(f"str.replace would build a text over {RENDER_MAX_CHARS} characters")


def _bounded_range(*args):
    r = range(*args)
    if len(r) > RENDER_MAX_RANGE:
        raise TemplateLimitError(f"range() of {len(r)} items is too large (limit {RENDER_MAX_RANGE})")

    def steps():
        for i in r:
            _tick()
            yield i

    return steps()


def render_bounded(compiled, source: str, seconds: float | None = None, **context: Any) -> str:
    """Render ``compiled`` (from :func:`compile_template`) with ``context`` within ``seconds`` (default
    :data:`RENDER_SECONDS`) and :data:`RENDER_MAX_CHARS` characters; returns the text.

    Raises:
        LLMTuneError: any failure (the template's own ``raise_exception``, a limit, an error inside the
            template), as one line naming ``source`` (the file the template came from).
    """
    import jinja2

    seconds = RENDER_SECONDS if seconds is None else seconds
    _render_state.deadline = time.monotonic() + seconds
    _render_state.seconds = seconds
    size, parts = 0, []
    try:
        for piece in compiled.generate(**context):
            size += len(piece)
            if size > RENDER_MAX_CHARS:
                raise TemplateLimitError(f"the output passed {RENDER_MAX_CHARS} characters")
            _tick()
            parts.append(piece)
    except TemplateLimitError as e:
        raise LLMTuneError(f"chat template of {source}: {e}; fix the template or choose a built-in one with "
                           "--template (e.g. chatml, llama3, qwen)") from None
    except jinja2.TemplateError as e:
        raise LLMTuneError(f"chat template of {source}: {e}") from None
    except RecursionError:
        raise LLMTuneError(f"chat template of {source}: recursion too deep; fix the template or choose a "
                           "built-in one with --template") from None
    except Exception as e:  # noqa: BLE001 - any error raised inside a user's template: one line
        raise LLMTuneError(f"chat template of {source}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                           "; fix the template or choose a built-in one with --template") from None
    finally:
        _render_state.deadline = None
    return "".join(parts)


@lru_cache(maxsize=16)
def compile_template(template: str):
    """Compile a chat template (a Jinja source string) in the bounded sandbox; cached per source.

    Raises:
        LLMTuneError: a syntax error (with its line), ``include``/``import``/``extends``, or nesting too deep.
    """
    import jinja2
    import jinja2.ext

    class _Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers) render their body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = _bounded_env_class()(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["range"] = _bounded_range
    try:
        tree = env.parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise LLMTuneError(f"chat_template: Jinja syntax error at line {e.lineno}: {e.message}") from None
    for node in tree.find_all((jinja2.nodes.Include, jinja2.nodes.Import, jinja2.nodes.FromImport,
                               jinja2.nodes.Extends)):
        raise LLMTuneError(f"chat_template: line {node.lineno} uses {type(node).__name__.lower()}, which a chat "
                           "template may not do (it must be one self-contained template); inline that part")
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LLMTuneError(f"chat_template: Jinja syntax error at line {e.lineno}: {e.message}") from None
    except RecursionError:
        raise LLMTuneError("chat_template: the template nests too deeply to compile") from None
