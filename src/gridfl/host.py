"""The host SDK: put an FL process on a grid node, watch it, fetch its checkpoints.

Talks to the node's admin API (``/gridfl/v1/``) with the admin token::

    from gridfl.host import HostClient

    with HostClient("http://127.0.0.1:5000", admin_token="s3cret") as host:
        host.host(
            model=initial_params,                       # list of arrays, SyftModel or State bytes
            plans={"training_plan": training_plan},     # Plan, ONNX bytes, or {variant: bytes}
            client_config={"name": "mnist", "version": "1.0", "batch_size": 10, "lr": 0.1},
            server_config={"max_workers": 10, "max_diffs": 10, "num_cycles": 20},
        )
        print(host.status("mnist", "1.0")["current"])
        params = host.retrieve("mnist", "1.0")          # latest checkpoint as numpy arrays
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from gridfl import _exceptions as errors
from gridfl import _messages, state
from gridfl.model import SyftModel

if TYPE_CHECKING:
    import httpx

__all__ = ["HostClient", "closed_cycles", "host_payload"]

class HostClient:
    """A blocking client of a grid node's admin API.

    Args:
        url: the node's base URL (``http://`` or ``https://``).
        admin_token: the node's admin token (``gridfl serve --admin-token``).
        timeout: seconds per request; hosting a large model may need more.
    """

    def __init__(self, url: str, *, admin_token: str, timeout: float = 120.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise errors.ConfigError(f"host URL must start with http:// or https://, got {url!r}")
        import httpx  # here: a simulation takes host_payload and starts no client

        self._http = httpx.Client(
            base_url=url.rstrip("/") + "/gridfl/v1",
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=timeout,
        )

    def __enter__(self) -> HostClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ calls
    def host(
        self,
        *,
        model: Any,
        plans: Mapping[str, Any],
        client_config: Mapping[str, Any],
        server_config: Mapping[str, Any] | None = None,
        averaging_plan: Any = None,
        protocols: Mapping[str, bytes] | None = None,
    ) -> dict[str, Any]:
        """Host a process; the node validates everything and stores all of it or nothing.

        ``model``: a list of arrays, a :class:`~gridfl.SyftModel` or ``State`` bytes.
        ``plans``: name -> a :class:`~gridfl.Plan`, ONNX bytes, or ``{variant: bytes}``
        (variants ``onnx``, ``tfjs``, ``torchscript``, ``list``).
        """
        payload = host_payload(
            model=model, plans=plans, client_config=client_config,
            server_config=server_config, averaging_plan=averaging_plan, protocols=protocols,
        )
        return self._json("POST", "/processes", json=payload)

    def processes(self) -> list[dict[str, Any]]:
        """Every hosted process with its current cycle and checkpoint count."""
        return self._json("GET", "/processes")["processes"]

    def status(
        self,
        name: str,
        version: str | None = None,
        *,
        cycles: int = 100,
        wait: float = 0.0,
        after: int | None = None,
    ) -> dict[str, Any]:
        """Configs of one process, and its latest ``cycles`` cycles (accepted, reported,
        metrics) and checkpoints.

        With ``wait`` (seconds, at most 60), the node holds the reply until a cycle newer
        than ``after`` has closed (default: the newest closed one when asked), the process
        stops running, or ``wait`` runs out: a watcher follows training without polling.

            >>> seen = 0
            >>> while True:  # doctest: +SKIP
            ...     st = host.status("mnist", "1.0", cycles=5, wait=30, after=seen)
            ...     seen = max([c["sequence"] for c in st["cycles"] if c["status"] != "open"],
            ...                default=seen)
            ...     if st["status"] != "running":
            ...         break
        """
        params: dict[str, Any] = {"cycles": cycles}
        kwargs: dict[str, Any] = {}
        if wait:
            params["wait"] = wait
            read = self._http.timeout.read
            if read is not None and read < wait + 10:  # the hold is not a stall
                kwargs["timeout"] = wait + 10
        if after is not None:
            params["after"] = after
        return self._json("GET", _path(name, version), params=params, **kwargs)

    def privacy(self, name: str, version: str | None = None) -> dict[str, Any] | None:
        """The differential-privacy figures of a process hosted with
        ``server_config.differential_privacy`` (docs/privacy.md), else ``None``: ``epsilon``
        spent after ``steps`` completed cycles at ``delta``, ``epsilon_next`` after one
        more, the current ``clip_norm``, ``budget_spent`` and its ``reason``.

            >>> host.privacy("mnist", "1.0")["epsilon"]  # doctest: +SKIP
            1.2141452944480204
        """
        return self.status(name, version, cycles=1).get("privacy")

    def evaluations(
        self, name: str, version: str | None = None, *, last: int = 100
    ) -> list[dict[str, Any]] | None:
        """The federated evaluations of a process hosted with ``server_config.evaluation``
        (docs/configs.md), oldest first, else ``None``: per evaluated ``checkpoint``, the
        workers ``accepted`` and ``reported``, the held-out examples (``num_samples``) and
        each metric averaged over the workers weighted by ``num_samples``.

            >>> host.evaluations("mnist", "1.0")[-1]  # doctest: +SKIP
            {'checkpoint': 3, 'opened_at': 1764..., 'accepted': 3, 'reported': 3,
             'num_samples': 75, 'metrics': {'loss': 0.31, 'accuracy': 0.91}}
        """
        return self.status(name, version, cycles=last).get("evaluations")

    def retrieve_bytes(self, name: str, version: str, checkpoint: int | str = "latest") -> bytes:
        """A checkpoint (by number or alias) as ``State`` bytes."""
        return self._request("GET", f"{_path(name, version)}/checkpoints/{checkpoint}").content

    def retrieve(
        self, name: str, version: str, checkpoint: int | str = "latest"
    ) -> list[np.ndarray]:
        """A checkpoint (by number or alias) as numpy arrays, in model-parameter order."""
        return state.loads(self.retrieve_bytes(name, version, checkpoint))

    def stop(self, name: str, version: str) -> dict[str, Any]:
        """Close the process to new cycles; checkpoints stay retrievable."""
        return self._json("POST", f"{_path(name, version)}/stop")

    def delete(self, name: str, version: str) -> dict[str, Any]:
        """Delete the process and everything stored for it."""
        return self._json("DELETE", _path(name, version))

    # ------------------------------------------------------------------ plumbing
    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise errors.TransportError(f"{method} {path}: {exc}") from exc
        if response.is_success:
            return response
        try:
            message = response.json().get("error") or response.reason_phrase
        except ValueError:
            message = response.text[:200] or response.reason_phrase
        cls = errors.error_for_status(response.status_code)
        raise cls(f"{method} {path}: {response.status_code} {message}")


def _path(name: str, version: str | None) -> str:
    segment = f"/processes/{quote(name, safe='')}"
    return segment + (f"/{quote(version, safe='')}" if version else "")


def host_payload(
    *,
    model: Any,
    plans: Mapping[str, Any],
    client_config: Mapping[str, Any],
    server_config: Mapping[str, Any] | None = None,
    averaging_plan: Any = None,
    protocols: Mapping[str, bytes] | None = None,
) -> dict[str, Any]:
    """The JSON body :meth:`HostClient.host` sends (a simulation validates the same one).

    >>> import numpy as np
    >>> body = host_payload(model=[np.zeros(2, np.float32)], plans={"p": b"onnx"},
    ...                     client_config={"name": "m", "version": "1"})
    >>> sorted(body)
    ['client_config', 'model', 'plans', 'server_config']
    """
    payload: dict[str, Any] = {
        "model": _b64(_model_bytes(model)),
        "plans": {name: _plan_variants(p) for name, p in plans.items()},
        "client_config": dict(client_config),
        "server_config": dict(server_config or {}),
    }
    if averaging_plan is not None:
        payload["averaging_plan"] = _b64(_plan_bytes(averaging_plan))
    if protocols:
        payload["protocols"] = {k: _b64(v) for k, v in protocols.items()}
    return payload


def _b64(data: bytes) -> str:
    return _messages.b64encode(data)


def _model_bytes(model: Any) -> bytes:
    if isinstance(model, bytes | bytearray | memoryview):
        return bytes(model)
    if isinstance(model, SyftModel):
        return model.to_bytes()
    if isinstance(model, Sequence):
        return state.dumps([np.asarray(p) for p in model])
    raise TypeError(f"model: expected arrays, a SyftModel or State bytes, got {type(model)}")


def _plan_bytes(plan: Any) -> bytes:
    if isinstance(plan, bytes | bytearray | memoryview):
        return bytes(plan)
    if hasattr(plan, "to_bytes"):
        return plan.to_bytes()
    raise TypeError(f"plan: expected a Plan or bytes, got {type(plan)}")


def _plan_variants(plan: Any) -> dict[str, str]:
    if isinstance(plan, Mapping):
        return {variant: _b64(_plan_bytes(b)) for variant, b in plan.items()}
    variants = {"onnx": _b64(_plan_bytes(plan))}
    if getattr(plan, "tfjs", None) is not None:  # compiled with tfjs=True
        variants["tfjs"] = _b64(plan.tfjs)
    return variants


def closed_cycles(
    host: HostClient, name: str, version: str, after: int, *, wait: float, window: int = 4
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Follow training without polling: one status request held until a cycle newer than
    ``after`` closes (or ``wait`` passes), listing the ``window`` newest cycles; asked
    again for a longer list when more closed meanwhile than that held. Returns the status
    and the cycles closed after ``after``, oldest first. (The node's cost grows with the
    cycles listed, about 0.5 ms each: hence a short window.)

        >>> status, closed = closed_cycles(host, "mnist", "1.0", seen, wait=30)  # doctest: +SKIP
    """
    status = host.status(name, version, cycles=window, wait=wait, after=after)
    listed = [c["sequence"] for c in status["cycles"]]
    size = window
    while listed and min(listed) > after + 1 and size < _messages.MAX_STATUS_CYCLES:
        # back to the last one taken in, with a margin for cycles closing in between
        size = min(_messages.MAX_STATUS_CYCLES, max(listed) - after + window)
        status = host.status(name, version, cycles=size)
        listed = [c["sequence"] for c in status["cycles"]]
    closed = [c for c in status["cycles"] if c["status"] != "open" and c["sequence"] > after]
    return status, sorted(closed, key=lambda c: c["sequence"])
