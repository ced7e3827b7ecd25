"""The ``llmtune`` command: ``train``, ``chat``, ``api``, ``export``, ``eval``, ``version``.

``llmtune train [config.yaml] [--key value ...] [key=value ...]`` takes LLaMA-Factory's keys (and the seed
document's spellings); flags override the file. A user mistake prints one ``llmtune: error: ...`` line and
exits with status 2; no traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from typing import Iterator, NoReturn

from llmtune import __version__
from llmtune.errors import LLMTuneError, Terminated

USAGE = """usage: llmtune <command> [config.yaml] [--key value ...]

commands:
  train     train or fine-tune a model (stages pt, sft, rm, dpo, kto, ppo, grpo)
  chat      chat with a model (and its adapters) in the terminal; reads stdin line by line when piped
  api       serve a model over OpenAI's HTTP API (chat and text completions, streaming)
  export    merge adapters and write a Hugging Face folder or a GGUF file
  eval      evaluate a model (and its adapters) on lm-evaluation-harness tasks (pip install 'llmtune[eval]')
  version   print the version
Run `llmtune <command> --help` for its keys, `llmtune train --help WORD` for the keys about WORD."""


def _version() -> int:
    import torch

    print(f"llmtune {__version__} (torch {torch.__version__}, python {sys.version.split()[0]})")
    return 0


def _help_request(argv: list[str]) -> tuple[bool, str | None]:
    """``(asked, keyword)`` for ``--help`` / ``-h`` in ``argv``; the word after it (not a flag) is a keyword."""
    for i, word in enumerate(argv):
        if word in ("-h", "--help"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            return True, nxt if nxt and not nxt.startswith("-") and not nxt.endswith((".yaml", ".yml", ".json")) \
                else None
    return False, None


#: set by :func:`run` (the process entry point): only a whole ``llmtune`` process freezes its imports for the
#: garbage collector (:func:`_long_lived_imports`); ``main`` called from a notebook or a test leaves it alone
_ENTRY_POINT = False


@contextlib.contextmanager
def _long_lived_imports() -> Iterator[None]:
    """Import a command's modules (torch and llmtune: about 1,000 modules) with the cyclic garbage collector
    paused, then move everything alive into its permanent generation (``gc.freeze``).

    Module-level objects live until the process ends, so collecting while they are made finds nothing to free:
    the full (generation 2) collections that the allocations trigger during ``import torch`` and llmtune's
    imports cost about 0.15-0.2 s of every command's start-up on this CPU, and every later full collection
    would walk them again. Only in a process started by :func:`run` (``_ENTRY_POINT``); elsewhere (a notebook
    calling :func:`main`) the collector is left as it is. Source: the Python documentation of the ``gc``
    module (``freeze``: later collections ignore the frozen objects; ``disable``/``enable``).
    """
    if not _ENTRY_POINT:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _train(argv: list[str]) -> int:
    from llmtune.config import parse_config

    cfg = parse_config(argv, command="train")
    with _long_lived_imports():
        from llmtune.train import run_train

    run_train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 1
    command, rest = argv[0], argv[1:]
    debug = os.environ.get("LLMTUNE_DEBUG") == "1"
    try:
        if command in ("version", "--version", "-V"):
            return _version()
        if command in ("train", "chat", "export"):
            asked, keyword = _help_request(rest)
            if asked:   # generated from the config's own key descriptions
                from llmtune.config import config_help

                print(config_help(command, keyword))
                return 0
        if command == "train":
            return _train(rest)
        if command == "chat":
            with _long_lived_imports():
                from llmtune.chat import main as chat_main

            return chat_main(rest)
        if command == "api":
            with _long_lived_imports():
                from llmtune.serve.server import main as api_main

            return api_main(rest)
        if command == "export":
            with _long_lived_imports():
                from llmtune.export import main as export_main

            return export_main(rest)
        if command == "eval":
            with _long_lived_imports():
                from llmtune.eval.run import main as eval_main

            return eval_main(rest)
        from llmtune.errors import nearest

        raise LLMTuneError(f"unknown command {command!r}; use train, chat, api, export, eval or version."
                           + nearest(command, ["train", "chat", "api", "export", "eval", "version"]))
    except LLMTuneError as e:
        if debug:
            raise
        print(f"llmtune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or vanished folder while writing: one line, no traceback
        if debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"llmtune: error: {where}{e.strerror or e} (errno {e.errno}); free space on that disk or choose a "
              "folder you can write to", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        if isinstance(stop, Terminated):  # SIGTERM during training: the checkpoint is saved
            print("llmtune: terminated (SIGTERM)", file=sys.stderr)
            return 143
        print("llmtune: interrupted", file=sys.stderr)
        return 130


def run() -> NoReturn:
    """Process entry point (the ``llmtune`` console script and ``python -m llmtune``): :func:`main`, then a
    quick exit with its status.

    After the command returns, the interpreter's normal shutdown walks and frees every object torch and the
    model left (garbage-collector passes over the whole heap, then module teardown): 0.4-1.5 s of wall time
    on this CPU after a training run, for memory the operating system reclaims anyway. So once ``main``
    has returned, the ``atexit`` handlers run (logging, multiprocessing, reporters' own hooks), stdout and
    stderr are flushed and the process ends with ``os._exit``. Every file llmtune writes is closed by then
    (``with`` blocks); when another non-daemon thread is still alive (a user's reporter), the process exits
    the ordinary way, which waits for it. An exception out of ``main`` also takes the ordinary way.
    ``main`` itself (what tests and notebooks call) never exits. Source: the Python documentation of
    ``os._exit`` (no cleanup handlers, no stdio flush) and of ``atexit`` (handlers run at normal termination).
    """
    global _ENTRY_POINT
    _ENTRY_POINT = True
    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the ordinary shutdown runs first (CPython's atexit module)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
