"""What a compiled plan depends on, as a plan cache key (see gridfl.plan_cache), and
compiling through the cache."""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gridfl._exceptions import GridflError
from gridfl.plan import Plan
from gridfl.plan_cache import PlanCache, resolve_cache

__all__ = ["cache_key", "module_description", "tensor_spec", "through_cache"]


def tensor_spec(t: torch.Tensor) -> list:
    return [list(t.shape), str(t.dtype)]


def _values(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@functools.cache
def _class_source(cls: type) -> str:
    """torch's own layers are named by torch's version; a user's class by the source
    file that defines it (its helpers included) or, without one, its code."""
    if cls.__module__.startswith("torch."):
        return ""
    try:
        source_file = inspect.getsourcefile(cls)
        if source_file:
            return hashlib.sha256(Path(source_file).read_bytes()).hexdigest()
    except (OSError, TypeError):
        pass
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    return "" if code is None else hashlib.sha256(repr(_code_parts(code)).encode()).hexdigest()


def _code_parts(code) -> tuple:
    consts = tuple(_code_parts(c) if hasattr(c, "co_code") else repr(c)
                   for c in code.co_consts)
    return code.co_code, consts, code.co_names


def _attribute(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ["tensor", *tensor_spec(value), _values(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_attribute(v) for v in value]
    return type(value).__qualname__ if not callable(value) else getattr(
        value, "__qualname__", type(value).__qualname__)


def module_description(module: torch.nn.Module) -> dict[str, Any]:
    """Every submodule's class (and its source), public attributes, params' and
    buffers' shapes, and buffers' values (constants of an eval-mode plan)."""
    layers = []
    for name, sub in module.named_modules():
        cls = type(sub)
        attrs = {k: _attribute(v) for k, v in sorted(vars(sub).items())
                 if not k.startswith("_")}
        source = _class_source(cls)  # type: ignore[arg-type]  # classes are hashable
        layers.append([name, f"{cls.__module__}.{cls.__qualname__}", source, attrs])
    return {
        "layers": layers,
        "params": [[n, *tensor_spec(p), p.requires_grad]
                   for n, p in module.named_parameters()],
        "buffers": [[n, *tensor_spec(b), _values(b)] for n, b in module.named_buffers()],
    }


def cache_key(kind: str, module, X, y, **options) -> Callable[[], dict]:
    """The key of a module's plan, described only when a cache is used (describing hashes
    the buffers' values)."""
    from gridfl.plan_cache import plan_key

    return lambda: plan_key(kind, {"module": module_description(module),
                                   "data": tensor_spec(X), "target": tensor_spec(y)},
                            **options)


def through_cache(cache: PlanCache | str | os.PathLike | bool | None,
                   key: Callable[[], dict], build: Callable[[], Plan]) -> Plan:
    """The plan stored under ``key()`` in the cache, else ``build()`` (which compiles and
    verifies it), stored there with its tfjs variant."""
    store = resolve_cache(cache)
    if store is None:
        return build()
    entry = key()
    cached = cached_plan(store, entry)
    if cached is not None:
        return cached
    plan = build()
    store.put(entry, {"plan": plan.to_bytes(), **({"tfjs": plan.tfjs} if plan.tfjs else {})})
    return plan


def cached_plan(store: PlanCache, key: dict) -> Plan | None:
    blobs = store.get(key)
    if blobs is None or set(blobs) - {"tfjs"} != {"plan"}:
        return None
    try:
        plan = Plan.from_bytes(blobs["plan"])
    except GridflError:  # a valid entry of bytes that are no plan: compile again
        return None
    plan.tfjs = blobs.get("tfjs")
    return plan
