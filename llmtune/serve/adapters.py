"""The LoRA adapters ``llmtune api`` serves by name, added and removed while it runs.

``--adapter_name_or_path a,b`` or ``name=path,...`` (vLLM's ``--lora-modules name=path``): each adapter is a model
name of ``GET /v1/models`` beside the base model; a plain path is named by the path as given. The adapters stay
unmerged on one base: a request's ``model`` picks its adapter per row, and rows of different adapters (and of the
base) decode in one batch (:mod:`llmtune.peft.rows`). ``POST /v1/load_lora_adapter`` /
``POST /v1/unload_lora_adapter`` (vLLM's endpoints) add and remove adapters between two engine steps.

Rules: an adapter recorded against another local base model (different weights), or trained on top of other
adapters than the server's base has merged, is refused; so is a folder whose tensors do not fit the model. An
adapter that running or queued requests use cannot be unloaded (HTTP 409: retry once they finish): unloading
never waits and never cuts a reply short.

Source: vLLM's multi-LoRA serving (``--lora-modules``, ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``,
their request fields ``lora_name``/``lora_path``).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from llmtune.engine import Engine
from llmtune.errors import LLMTuneError
from llmtune.serve.errors import APIError

__all__ = ["parse_adapter_specs", "adapter_lineage", "LockedEngine", "AdapterRegistry"]

log = logging.getLogger("llmtune.serve")


def parse_adapter_specs(value: Any) -> list[tuple[str, str]]:
    """``--adapter_name_or_path`` as ``[(name, path), ...]``: comma-separated ``path`` or ``name=path`` items
    (a list of them is accepted too); a plain path is its own name.

    Raises:
        LLMTuneError: an empty name or path in ``name=path``, or a name given twice (the flag is named).
    """
    if not value:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out: list[tuple[str, str]] = []
    for raw in items:
        item = str(raw).strip()
        if not item:
            continue
        name, eq, path = item.partition("=")
        if not eq:
            name, path = item, item
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise LLMTuneError(f"--adapter_name_or_path: {item!r} needs both a name and a path (name=path)")
        if any(n == name for n, _ in out):
            raise LLMTuneError(f"--adapter_name_or_path: the adapter name {name!r} is given twice; name each "
                               "adapter once (name=path)")
        out.append((name, path))
    return out


def adapter_lineage(path: str) -> tuple[Path, str, list[Path]]:
    """``(folder, root base, parent adapters)`` of an adapter folder (:func:`llmtune.runs.resolve_model_chain`):
    the absolute folder, the base its chain roots at, and the adapters it was trained on top of (root first).

    Raises:
        LLMTuneError: the folder does not exist or is not a LoRA adapter (one line naming it).
    """
    from llmtune.peft.io import read_adapter_config
    from llmtune.runs import resolve_model_chain

    p = Path(os.path.expanduser(path))
    read_adapter_config(p)
    root, chain = resolve_model_chain(p)
    return p.resolve(), root, list(chain[:-1])


class LockedEngine(Engine):
    """An :class:`~llmtune.engine.Engine` whose :meth:`step` holds :attr:`lock`, so that the model's adapters can
    change between two steps (:class:`AdapterRegistry`). Arguments as :class:`~llmtune.engine.Engine`."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lock = threading.Lock()

    def step(self) -> list:
        """:meth:`Engine.step` under :attr:`lock`."""
        with self.lock:
            return super().step()


class AdapterRegistry:
    """The served model names: the base and its adapters, with loading and unloading while serving.

    Args:
        model: the served model (adapters unmerged, none active: a request without adapter runs the base).
        base_name: the base's model name; base_root: the root base model path (``model.adapter_chain.base``);
        parents: the adapter folders merged into the served base (``model.adapter_chain.adapters``).
        engine: the :class:`LockedEngine` stepping ``model``.

    Thread-safety: :meth:`resolve`, :meth:`load`, :meth:`unload` may run in any thread; model changes happen
    under the engine's lock (between steps), the name table under :attr:`lock`.
    """

    def __init__(self, model: Any, base_name: str, base_root: str, parents: Sequence[Path],
                 engine: LockedEngine) -> None:
        self.model, self.base_name, self.base_root = model, base_name, str(base_root)
        self.parents = [Path(p) for p in parents]
        self.engine = engine
        self.scheduler: Any = None            # set by the server: queued jobs count as users of an adapter
        self.lock = threading.Lock()
        self.paths: dict[str, str] = {}       # adapter name -> folder

    def names(self) -> list[str]:
        """The model names served: the base first, then the adapters in load order."""
        with self.lock:
            return [self.base_name, *self.paths]

    def resolve(self, model_name: str) -> Optional[str]:
        """The adapter a request for ``model_name`` runs (None: the base). Raises :class:`KeyError` when no
        served model has that name."""
        with self.lock:
            if model_name == self.base_name:
                return None
            if model_name in self.paths:
                return model_name
        raise KeyError(model_name)

    # -- checks -----------------------------------------------------------------------------------------------
    def check_folder(self, path: str) -> Path:
        """The absolute adapter folder ``path`` if it fits this server's base, else :class:`LLMTuneError` (one
        line: not an adapter folder, recorded on other local base weights, or trained on other parent adapters
        than the ones merged into the served base)."""
        from llmtune.runs import same_base

        folder, root, parents = adapter_lineage(path)
        if [p.resolve() for p in parents] != [p.resolve() for p in self.parents]:
            have = ", ".join(str(p) for p in self.parents) or "none"
            raise LLMTuneError(f"adapter {path} was trained on top of {len(parents)} other adapter(s) "
                               f"({', '.join(str(p) for p in parents) or 'none'}); this server's base has "
                               f"{have} merged: serve it from a server started on that chain")
        if not same_base(root, self.base_root):
            if Path(os.path.expanduser(str(root))).exists() and Path(self.base_root).exists():
                raise LLMTuneError(f"adapter {path} was trained on the base model {root}, not on {self.base_root} "
                                   "that this server serves (the weights differ)")
            log.warning("llmtune api: adapter %s records the base %s (not found here); loading it because its "
                        "tensor shapes are checked", path, root)
        return folder

    def _users(self, name: str) -> int:
        """Rows running or queued with adapter ``name`` (engine lock held)."""
        n = sum(1 for r in self.engine.rows if r.req.adapter == name)
        n += sum(len(g) for g in self.engine.waiting if g and g[0].req.adapter == name)
        sched = self.scheduler
        if sched is not None:
            with sched._lock:
                n += sum(j.n for j in sched._new if j.request.adapter == name)
        return n

    # -- changes ----------------------------------------------------------------------------------------------
    def add(self, name: str, path: str) -> None:
        """Load adapter folder ``path`` as model name ``name`` (between engine steps).

        Raises:
            LLMTuneError: the name is taken (the base's or a loaded adapter's), or the folder is refused
                (:meth:`check_folder`, or :func:`llmtune.peft.load_adapter`'s shape/target errors); the model
                is left as it was.
        """
        from llmtune.peft import delete_adapter, list_adapters, load_adapter, set_adapter

        with self.lock:
            if name == self.base_name or name in self.paths:
                raise LLMTuneError(f"the model name {name!r} is already served"
                                   + (" (the base model)" if name == self.base_name else f" ({self.paths[name]})")
                                   + ": unload it first or pick another lora_name")
        folder = self.check_folder(path)
        with self.engine.lock:
            try:
                load_adapter(self.model, str(folder), adapter_name=name, is_trainable=False)
            except BaseException:
                if name in list_adapters(self.model):
                    delete_adapter(self.model, name)
                raise
            finally:
                set_adapter(self.model, [])      # a request without adapter runs the base
            with self.lock:
                self.paths[name] = str(folder)

    def remove(self, name: str) -> None:
        """Unload adapter ``name`` (between engine steps).

        Raises:
            APIError: 404 when no adapter has that name (400 for the base model), 409 while requests use it.
        """
        from llmtune.peft import delete_adapter

        with self.engine.lock:
            with self.lock:
                if name == self.base_name:
                    raise APIError(400, f"{name!r} is the base model, not an adapter: it cannot be unloaded",
                                   "lora_name", "invalid_value")
                if name not in self.paths:
                    have = ", ".join(self.paths) or "none"
                    raise APIError(404, f"no LoRA adapter named {name!r} is loaded (loaded: {have})", "lora_name",
                                   "model_not_found")
                users = self._users(name)
                if users:
                    raise APIError(409, f"the LoRA adapter {name!r} is in use by {users} running or queued "
                                        "request(s); unload it when they have finished", "lora_name",
                                   "adapter_in_use")
                del self.paths[name]
            delete_adapter(self.model, name)
