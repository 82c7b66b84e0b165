"""The node's side of one secure-aggregation cycle: collect each stage, route the sealed
shares, fold the masked inputs into a running sum, and unmask the sum. No I/O.

The node learns public keys, sealed shares it cannot open, masked vectors (uniformly
random mod 2**b on their own) and, at the end, the sum of the survivors' inputs. Workers
that drop out at any stage are tolerated while every reconstruction still has
``threshold`` shares and at least ``min_survivors`` inputs are summed; otherwise
:meth:`NodeSession.close_stage` raises :class:`~gridfl.AggregationAbortedError` and nothing
is revealed.

Stages: ``add_keys`` ... ``close_stage()`` -> rosters; ``add_shares`` ...
``close_stage()`` -> shares to forward; ``add_masked`` ... ``close_stage()`` -> unmask
requests; ``add_unmask`` ... ``close_stage()`` -> the signed sum (see
:mod:`gridfl.secagg.quantize`).

    >>> from gridfl.secagg.params import SecAggParams
    >>> p = SecAggParams.from_config({"threshold": 2}, max_workers=3)
    >>> node = NodeSession(p, b"process 1 cycle 1", length=4)
    >>> node.stage
    'advertise_keys'
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from gridfl._exceptions import (
    AggregationAbortedError,
    ConflictError,
    InvalidRequestError,
    ProtocolError,
)
from gridfl.secagg import crypto, shamir
from gridfl.secagg.graph import neighbour_graph
from gridfl.secagg.messages import (
    ADVERTISE,
    MASKED,
    SHARE,
    STAGES,
    UNMASK,
    AdvertiseKeys,
    EncryptedShares,
    MaskedInput,
    Roster,
    UnmaskRequest,
    UnmaskShares,
)
from gridfl.secagg.params import SecAggParams
from gridfl.secagg.quantize import to_signed
from gridfl.secagg.worker import mask_sign

DONE = "done"


class NodeSession:
    """One cycle's protocol state on the node (``length`` = model values + 1 weight)."""

    def __init__(self, params: SecAggParams, session: bytes, length: int) -> None:
        self.params = params
        self.session = session
        self.length = length
        self.stage = ADVERTISE
        self.keys: dict[str, AdvertiseKeys] = {}
        self.graph: dict[str, frozenset[str]] = {}
        self.shared: dict[str, dict[str, bytes]] = {}  # sender -> recipient -> sealed
        self._total: np.ndarray | None = np.zeros(length, np.uint64)
        self._load_total: Callable[[], bytes] | None = None
        #: the running sum changed since it was loaded (it must be stored again)
        self.total_changed = True
        self.masked: set[str] = set()
        self.answers: dict[str, UnmaskShares] = {}
        self.requests: dict[str, UnmaskRequest] = {}
        #: the signed sum of the survivors' inputs, once the last stage closed
        self.result: np.ndarray | None = None
        #: the workers' messages taken since :meth:`take_written`, as ``(stage, worker,
        #: JSON)``: the database stores each once, O(its own size), not the whole round
        self.written: list[tuple[str, str, dict[str, Any]]] = []

    @property
    def total(self) -> np.ndarray:
        """The running sum of the masked inputs (mod 2**64; reduced at the end). Loaded
        only when used: most messages do not touch it, and it is 8 bytes per parameter."""
        if self._total is None:
            assert self._load_total is not None
            self._total = np.frombuffer(self._load_total(), "<u8").astype(np.uint64)
        return self._total

    def read_total_with(self, load: Callable[[], bytes]) -> None:
        """Where to read the stored running sum from, if it is not loaded yet."""
        self._load_total = load

    # ---------------------------------------------------------------- submissions
    def _expect(self, stage: str, worker_id: str, allowed: Any, seen: Any) -> None:
        if self.stage != stage:
            raise InvalidRequestError(
                f"secure aggregation is at stage {self.stage!r}; a {stage!r} message is "
                "late, early or replayed"
            )
        if worker_id not in allowed:
            raise InvalidRequestError(
                f"worker is not part of stage {stage!r} of this cycle (dropped earlier or "
                "never joined)"
            )
        if worker_id in seen:
            raise ConflictError(f"worker already sent its {stage!r} message")

    def add_keys(self, worker_id: str, msg: AdvertiseKeys) -> None:
        self._expect(ADVERTISE, worker_id, (worker_id,), self.keys)
        used = {k for m in self.keys.values() for k in (m.cipher_key, m.mask_key)}
        if {msg.cipher_key, msg.mask_key} & used or msg.cipher_key == msg.mask_key:
            raise InvalidRequestError("public keys already advertised in this cycle")
        if msg.credential is not None and any(
            m.credential == msg.credential for m in self.keys.values()
        ):
            raise InvalidRequestError("this credential already advertised keys in this cycle")
        self.keys[worker_id] = msg
        self.written.append((ADVERTISE, worker_id, msg.to_json()))

    def add_shares(self, worker_id: str, msg: EncryptedShares) -> None:
        self._expect(SHARE, worker_id, self.graph, self.shared)
        if set(msg.shares) != self.graph[worker_id]:
            raise InvalidRequestError(
                "shares must be addressed to exactly the worker's neighbours in its roster"
            )
        self.shared[worker_id] = dict(msg.shares)
        self.written.append((SHARE, worker_id, msg.to_json()))

    def add_masked(self, worker_id: str, msg: MaskedInput) -> None:
        """Fold one masked input into the running sum (O(model) memory)."""
        self._expect(MASKED, worker_id, self.shared, self.masked)
        if msg.vector.shape != (self.length,):
            raise InvalidRequestError(f"masked vector must have {self.length} values")
        total = self.total
        total += msg.vector  # uint64 wraps mod 2**64; reduced mod 2**b at the end
        self.total_changed = True
        self.masked.add(worker_id)
        self.written.append((MASKED, worker_id, {}))  # the vector itself is in the sum

    def add_unmask(self, worker_id: str, msg: UnmaskShares) -> None:
        self._expect(UNMASK, worker_id, self.requests, self.answers)
        req = self.requests[worker_id]
        if set(msg.seed_shares) != set(req.survivors) or set(msg.key_shares) != set(req.dropped):
            raise InvalidRequestError("unmask answer must cover exactly the workers asked for")
        self.answers[worker_id] = msg
        self.written.append((UNMASK, worker_id, msg.to_json()))

    # ---------------------------------------------------------------- stage ends
    def close_stage(self) -> Any:
        """End the current stage (all expected messages in, or its timeout) and return
        what goes to each worker next; raises AggregationAbortedError when too few remain."""
        stage = self.stage
        closing: Callable[[], Any] = {
            ADVERTISE: self._close_advertise,
            SHARE: self._close_share,
            MASKED: self._close_masked,
            UNMASK: self._close_unmask,
        }[stage]
        result = closing()
        if stage == UNMASK:
            self.result = result
        self.stage = STAGES[STAGES.index(stage) + 1] if stage != UNMASK else DONE
        return result

    def _need(self, count: int, what: str) -> None:
        need = max(self.params.min_survivors, self.params.threshold)
        if count < need:
            self.stage = DONE
            raise AggregationAbortedError(
                f"secure aggregation aborted: {count} workers {what}; it needs {need}"
            )

    def _close_advertise(self) -> dict[str, Roster]:
        self._need(len(self.keys), "advertised keys")
        ids = sorted(self.keys)
        self.graph = neighbour_graph(ids, self.params.degree(len(ids)))
        return {u: self.roster_for(u) for u in ids}

    def _close_share(self) -> dict[str, EncryptedShares]:
        self._need(len(self.shared), "shared keys")
        return {u: self.shares_for(u) for u in self.shared}

    def _close_masked(self) -> dict[str, UnmaskRequest]:
        self._need(len(self.masked), "sent masked inputs")
        for u in self.masked:
            near = self.graph[u] & set(self.shared)
            self.requests[u] = UnmaskRequest(
                survivors=sorted((near & self.masked) | {u}), dropped=sorted(near - self.masked)
            )
        return dict(self.requests)

    # ---------------------------------------------------------------- what each worker gets
    def roster_for(self, u: str) -> Roster:
        """Stage 2's message to ``u``: its neighbours' public keys."""
        return Roster({v: self.keys[v] for v in self.graph[u]})

    def shares_for(self, u: str) -> EncryptedShares:
        """Stage 3's message to ``u``: the sealed shares its neighbours addressed to it."""
        return EncryptedShares({v: self.shared[v][u] for v in self.graph[u] if v in self.shared})

    def participants(self, stage: str) -> Collection[str]:
        """Who is expected to send a message at ``stage`` (the previous stage's senders)."""
        expected: dict[str, Collection[str]] = {
            ADVERTISE: self.keys,
            SHARE: self.graph,
            MASKED: self.shared,
            UNMASK: self.requests,
        }
        return expected[stage]

    def received(self, stage: str) -> int:
        """How many workers sent their message at ``stage``."""
        sent: dict[str, Collection[str]] = {
            ADVERTISE: self.keys,
            SHARE: self.shared,
            MASKED: self.masked,
            UNMASK: self.answers,
        }
        return len(sent[stage])

    # ---------------------------------------------------------------- persistence
    def take_written(self) -> list[tuple[str, str, dict[str, Any]]]:
        """The workers' messages taken since the last call (to store), and forget them."""
        out, self.written = self.written, []
        return out

    def messages(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Every worker message this round took, as ``(stage, worker, JSON)``."""
        return (
            [(ADVERTISE, u, k.to_json()) for u, k in self.keys.items()]
            + [(SHARE, u, EncryptedShares(s).to_json()) for u, s in self.shared.items()]
            + [(MASKED, u, {}) for u in sorted(self.masked)]
            + [(UNMASK, u, a.to_json()) for u, a in self.answers.items()]
        )

    def state_json(self) -> dict[str, Any]:
        """What the node decided at the stage closes (the neighbour graph, the unmask
        requests): written when a stage closes. The workers' own messages are stored one
        row each (:meth:`take_written`)."""
        return {
            "graph": {u: sorted(v) for u, v in self.graph.items()},
            "requests": {u: r.to_json() for u, r in self.requests.items()},
        }

    def to_state(self) -> tuple[dict[str, Any], bytes]:
        """``(JSON-able state, running sum bytes)``: everything :meth:`from_state` needs,
        so that any server process can take the next message. Only public keys, sealed
        shares, who sent what, and the masked running sum."""
        data = {"stage": self.stage, **self.state_json(), "messages": self.messages()}
        return data, self.total.astype("<u8").tobytes()

    @classmethod
    def from_state(
        cls,
        params: SecAggParams,
        session: bytes,
        length: int,
        data: dict,
        total: bytes | Callable[[], bytes],
    ) -> NodeSession:
        """The session :meth:`to_state` stored (``data``: ``stage``, the
        :meth:`state_json` keys and ``messages``); ``total`` may be a function that reads
        the running sum when it is first needed."""
        node = cls(params, session, length)
        node.stage = data["stage"]
        node.graph = {u: frozenset(v) for u, v in data["graph"].items()}
        node.requests = {u: UnmaskRequest.from_json(r) for u, r in data["requests"].items()}
        for stage, u, body in data["messages"]:
            if stage == ADVERTISE:
                node.keys[u] = AdvertiseKeys.from_json(body)
            elif stage == SHARE:
                node.shared[u] = dict(EncryptedShares.from_json(body).shares)
            elif stage == MASKED:
                node.masked.add(u)
            else:
                node.answers[u] = UnmaskShares.from_json(body)
        node._total = None
        node._load_total = total if callable(total) else lambda: total
        node.total_changed = False
        return node

    def _close_unmask(self) -> np.ndarray:
        """Remove every mask from the running sum; the signed sum of the survivors' inputs."""
        t, bits = self.params.threshold, self.params.field_bits
        # every mask to take out of the sum, applied in one pass at the end
        masks = [
            (self._reconstruct(v, "seed_shares", crypto.KEY_BYTES), -1)
            for v in sorted(self.masked)
        ]
        for v in sorted(set(self.shared) - self.masked):
            key = self._reconstruct(v, "key_shares", crypto.KEY_BYTES)
            if crypto.public_of(key) != self.keys[v].mask_key:
                self.stage = DONE
                raise AggregationAbortedError(
                    f"secure aggregation aborted: the mask key shares of a dropped worker do "
                    f"not combine into its key (a worker sent a wrong share; t = {t})"
                )
            for w in self.graph[v] & self.masked:
                pair = crypto.agree(key, self.keys[w].mask_key, self.session, crypto.PURPOSE_MASK)
                # w added mask_sign(w, v) * PRG(pair) for v: take it back out
                masks.append((pair, -mask_sign(w, v)))
        total = np.array(self.total, np.uint64, copy=True)
        crypto.add_masks(total, masks)
        if bits < 64:
            total &= np.uint64((1 << bits) - 1)
        return to_signed(total, bits)

    def _reconstruct(self, v: str, kind: str, size: int) -> bytes:
        shares = [getattr(ans, kind)[v] for ans in self.answers.values() if v in getattr(ans, kind)]
        if len(shares) < self.params.threshold:
            self.stage = DONE
            raise AggregationAbortedError(
                f"secure aggregation aborted: {len(shares)} shares to unmask a worker; the "
                f"threshold is {self.params.threshold}"
            )
        try:
            return shamir.combine(shares[: self.params.threshold], size)
        except ProtocolError as e:
            self.stage = DONE
            raise AggregationAbortedError(f"secure aggregation aborted: {e}") from None
