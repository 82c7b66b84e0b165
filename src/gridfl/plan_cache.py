"""A content-addressed cache of compiled plans (no torch needed to read it).

An entry is named by the SHA-256 of its key (a JSON-able description of everything the
compiled bytes depend on) and holds the key itself and the SHA-256 of each blob, so an
entry that is truncated, corrupt or written for another key is ignored (and rebuilt by
the caller), never trusted. Entries are written to a temporary file and renamed into
place, so concurrent writers of one key leave one whole entry.

The directory is ``$GRIDFL_PLAN_CACHE`` if set (``off`` disables the cache), else the
user cache directory (``$XDG_CACHE_HOME/gridfl/plans``, ``~/.cache/gridfl/plans``)::

    >>> import tempfile
    >>> cache = PlanCache(tempfile.mkdtemp())
    >>> key = {"model": "2nn", "torch": "2.13.0"}
    >>> cache.get(key) is None
    True
    >>> _ = cache.put(key, {"training_plan": b"..."})
    >>> cache.get(key)
    {'training_plan': b'...'}
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_VAR", "PlanCache", "compiler_versions", "default_cache_dir", "key_digest",
    "plan_key", "resolve_cache", "source_digest",
]

ENV_VAR = "GRIDFL_PLAN_CACHE"
_MAGIC = b"gridfl-plan-cache 1\n"
_MAX_ENTRIES = 256  # least recently used entries beyond this are removed


def default_cache_dir() -> Path | None:
    """The cache directory, or None when ``$GRIDFL_PLAN_CACHE`` is ``off``."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env.lower() in ("off", "0", "false", "no"):
        return None
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gridfl" / "plans"


def resolve_cache(cache: PlanCache | str | os.PathLike | bool | None) -> PlanCache | None:
    """``None``/``True``: the default directory; ``False``: no cache; a path or a
    :class:`PlanCache`: that one."""
    if cache is False:
        return None
    if isinstance(cache, PlanCache):
        return cache
    if cache is None or cache is True:
        directory = default_cache_dir()
        return None if directory is None else PlanCache(directory)
    return PlanCache(cache)


@functools.cache
def source_digest(*relative_paths: str) -> str:
    """SHA-256 of gridfl's own source files (paths relative to the package; a folder
    stands for its ``*.py`` files), so that an edited checkout makes new keys."""
    package = Path(__file__).resolve().parent
    paths: list[Path] = []
    for rel in relative_paths:
        target = package / rel
        paths += sorted(target.glob("*.py")) if target.is_dir() else [target]
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@functools.cache
def compiler_versions() -> dict[str, str]:
    """gridfl's version and a digest of the sources that shape a plan (so an edited
    checkout makes new keys), and the versions of the libraries that make plans."""
    from gridfl import __version__

    found = {"gridfl": __version__,
             "gridfl_sources": source_digest("compiler", "plan.py", "demo/models.py")}
    for dist in ("torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "-"
    return found


def plan_key(kind: str, subject: Any, **options: Any) -> dict[str, Any]:
    """The cache key of compiled plans: what is compiled (``subject``: a model's
    description, JSON-able), the options that shape the plans, and
    :func:`compiler_versions`. The compiler and the demo (which names its models
    without importing torch) both build their keys with it::

        >>> key = plan_key("demo", {"model": "2nn"}, lr=0.1)
        >>> sorted(key), key["options"]
        (['options', 'plan', 'subject', 'versions'], {'lr': 0.1})
    """
    return {"plan": kind, "subject": subject, "options": options,
            "versions": compiler_versions()}


def key_digest(key: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of a key's canonical JSON: the name of its entry."""
    return hashlib.sha256(_canonical(key)).hexdigest()


def _canonical(key: Mapping[str, Any]) -> bytes:
    return json.dumps(key, sort_keys=True, separators=(",", ":")).encode()


class PlanCache:
    """Named blobs (plan bytes, model bytes) stored under a key in ``directory``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path(self, key: Mapping[str, Any]) -> Path:
        return self.directory / f"{key_digest(key)}.entry"

    def get(self, key: Mapping[str, Any]) -> dict[str, bytes] | None:
        """The blobs stored under ``key``, or None (missing, corrupt or another key's)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        blobs = _parse(data, _canonical(key))
        if blobs is not None:
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: kept when old entries are pruned
        return blobs

    def put(self, key: Mapping[str, Any], blobs: Mapping[str, bytes]) -> Path | None:
        """Store ``blobs`` under ``key``; a cache that cannot be written only warns."""
        header = {
            "key": json.loads(_canonical(key)),
            "blobs": [
                {"name": n, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                for n, b in blobs.items()
            ],
        }
        data = b"".join([_MAGIC, _canonical(header), b"\n", *blobs.values()])
        path = self.path(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)  # atomic: readers see no entry or a whole one
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._prune()
        except OSError as e:
            warnings.warn(f"could not write the plan cache in {self.directory}: {e}",
                          stacklevel=2)
            return None
        return path

    def _prune(self) -> None:
        entries = sorted(self.directory.glob("*.entry"), key=_mtime, reverse=True)
        for old in entries[_MAX_ENTRIES:]:
            old.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _parse(data: bytes, canonical_key: bytes) -> dict[str, bytes] | None:
    if not data.startswith(_MAGIC):
        return None
    end = data.find(b"\n", len(_MAGIC))
    if end < 0:
        return None
    try:
        header = json.loads(data[len(_MAGIC):end])
        if _canonical(header["key"]) != canonical_key:
            return None
        blobs: dict[str, bytes] = {}
        offset = end + 1
        for entry in header["blobs"]:
            blob = data[offset:offset + int(entry["size"])]
            offset += len(blob)
            if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
                return None
            blobs[str(entry["name"])] = blob
    except (ValueError, KeyError, TypeError):
        return None
    return blobs if offset == len(data) else None
