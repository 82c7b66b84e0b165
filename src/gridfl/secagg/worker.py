"""The worker's side of one secure-aggregation cycle: a state machine with no I/O.

Each method takes the node's message for one stage and returns the worker's reply; a
message out of order, for another cycle, or asking for what must stay secret raises
:class:`~gridfl.ProtocolError` and the worker answers nothing. In particular
:meth:`WorkerSession.unmask` refuses a request that would give the node both secrets of
one worker (Bonawitz et al., round 4), which Flower's SecAgg+ does not check.

    >>> from gridfl.secagg.params import SecAggParams
    >>> p = SecAggParams.from_config({"threshold": 2}, max_workers=3)
    >>> w = WorkerSession(p, "w1", b"process 1 cycle 1")
    >>> len(w.advertise().mask_key)
    32
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence

import numpy as np

from gridfl._exceptions import ProtocolError
from gridfl.secagg import crypto, quantize, shamir
from gridfl.secagg.identity import Identity, Verifier
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

_SHARE = struct.Struct(f">I{shamir.SHARE_BYTES}s{shamir.SHARE_BYTES}s")


def share_header(session: bytes, src: str, dst: str) -> bytes:
    """Associated data of a sealed share: it opens only for this cycle, sender, recipient."""
    return b"\0".join((b"gridfl secagg share", session, src.encode(), dst.encode()))


def mask_sign(me: str, other: str) -> int:
    """+1 when ``me`` adds the pairwise mask it shares with ``other``, -1 when it subtracts."""
    return 1 if me < other else -1


def add_masks(vec: np.ndarray, seed: bytes, pairs: dict[str, bytes], me: str, bits: int) -> None:
    """``vec += PRG(seed) + sum(sign * PRG(pair seed))`` mod 2**bits, in place, for a uint64
    ``vec`` (it wraps mod 2**64, then is reduced once)."""
    crypto.add_masks(vec, [(seed, 1), *((s, mask_sign(me, o)) for o, s in pairs.items())])
    if bits < 64:
        vec &= np.uint64((1 << bits) - 1)


class WorkerSession:
    """One worker's run of the four stages of one cycle (``session`` names the cycle; a
    worker that learns it from the node's first reply passes it to :meth:`bind`).

    With an ``identity`` it signs the keys it advertises (bind the session first); with a
    ``verifier`` (the authority's public key) it shares only with neighbours whose keys
    are signed by distinct identities the authority certified."""

    def __init__(
        self,
        params: SecAggParams,
        worker_id: str,
        session: bytes = b"",
        *,
        identity: Identity | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self.params = params
        self.me = worker_id
        self.session = session
        self.identity = identity
        self.verifier = verifier
        self.done: str | None = None
        self._cipher = crypto.KeyPair.generate()
        self._mask = crypto.KeyPair.generate()
        self._seed = secrets.token_bytes(crypto.KEY_BYTES)
        self._roster: dict[str, tuple[bytes, bytes]] = {}
        self._held: dict[str, tuple[shamir.Share, shamir.Share]] = {}

    def bind(self, session: bytes) -> None:
        """Set the cycle's session name; a node that changes it mid-cycle is refused."""
        if self.session and session != self.session:
            raise ProtocolError("the node changed the secure-aggregation session mid-cycle")
        self.session = session

    def _enter(self, stage: str) -> None:
        expected = STAGES[STAGES.index(self.done) + 1] if self.done else ADVERTISE
        if stage != expected:
            raise ProtocolError(
                f"secure aggregation: got stage {stage!r}, expected {expected!r} "
                "(replayed or reordered)"
            )
        self.done = stage

    # stage 1
    def advertise(self) -> AdvertiseKeys:
        self._enter(ADVERTISE)
        if self.identity is None:
            return AdvertiseKeys(self._cipher.public, self._mask.public)
        if not self.session:
            raise ProtocolError("no session: bind() the cycle's session before signing keys")
        c, m = self._cipher.public, self._mask.public
        sig = self.identity.sign(self.session, self.me, c, m)
        return AdvertiseKeys(c, m, sig, self.identity.credential)

    # stage 2
    def share_keys(self, roster: Roster) -> EncryptedShares:
        """Check the roster, then Shamir-share the self-mask seed and the mask key among
        the neighbours and self, each share sealed for its recipient."""
        self._enter(SHARE)
        if not self.session:
            raise ProtocolError("no session: bind() the cycle's session before sharing keys")
        t = self.params.threshold
        if self.me in roster.neighbours:
            raise ProtocolError("roster lists this worker as its own neighbour")
        if len(roster.neighbours) + 1 < t:
            raise ProtocolError(
                f"roster has {len(roster.neighbours)} neighbours; threshold {t} needs "
                f"at least {t - 1}"
            )
        keys = [k for a in roster.neighbours.values() for k in (a.cipher_key, a.mask_key)]
        keys += [self._cipher.public, self._mask.public]
        if len(set(keys)) != len(keys):
            raise ProtocolError("roster repeats a public key (a replayed or forged key)")
        if self.verifier is not None:
            self._check_signed(roster)
        self._roster = {v: (a.cipher_key, a.mask_key) for v, a in roster.neighbours.items()}
        order = [*sorted(self._roster), self.me]
        seed_shares = shamir.split(self._seed, t, len(order))
        key_shares = shamir.split(self._mask.private, t, len(order))
        out = {}
        for dst, s, k in zip(order, seed_shares, key_shares, strict=True):
            if dst == self.me:
                self._held[dst] = (s, k)
                continue
            key = crypto.agree(
                self._cipher.private, self._roster[dst][0], self.session, crypto.PURPOSE_SHARES
            )
            plain = _SHARE.pack(s[0], shamir.encode_y(s[1]), shamir.encode_y(k[1]))
            out[dst] = crypto.seal(key, plain, share_header(self.session, self.me, dst))
        return EncryptedShares(out)

    def _check_signed(self, roster: Roster) -> None:
        """Every neighbour's keys signed by an identity the authority certified, no
        identity twice (a node cannot pose as many workers with one credential)."""
        assert self.verifier is not None
        seen = {self.identity.public_key} if self.identity is not None else set()
        for v, a in sorted(roster.neighbours.items()):
            who = self.verifier.check(
                self.session, v, a.cipher_key, a.mask_key, a.signature, a.credential
            )
            if who in seen:
                raise ProtocolError(
                    f"roster lists the identity of worker {v} twice (one credential posing "
                    "as several workers)"
                )
            seen.add(who)

    # stage 3
    def masked_input(
        self,
        received: EncryptedShares,
        diff: Sequence[np.ndarray],
        num_samples: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> MaskedInput:
        """Open the shares sent to it, then mask the quantized, weighted diff with its
        self mask and a pairwise mask per neighbour that shared."""
        # the encoded vector is this call's own: it is masked in place
        return self._masked(received, quantize.encode(diff, num_samples, self.params, rng))

    def masked_vector(self, received: EncryptedShares, vec: np.ndarray) -> MaskedInput:
        """:meth:`masked_input` for an already encoded input vector (left unchanged)."""
        return self._masked(received, np.array(vec, np.uint64, copy=True))

    def _masked(self, received: EncryptedShares, vec: np.ndarray) -> MaskedInput:
        self._enter(MASKED)
        unknown = set(received.shares) - set(self._roster)
        if unknown:
            raise ProtocolError(f"shares from workers not in the roster: {sorted(unknown)}")
        if len(received.shares) + 1 < self.params.threshold:
            raise ProtocolError("fewer neighbours shared than the threshold needs")
        for src, sealed in received.shares.items():
            key = crypto.agree(
                self._cipher.private, self._roster[src][0], self.session, crypto.PURPOSE_SHARES
            )
            x, s_y, k_y = _SHARE.unpack(
                crypto.open_sealed(key, sealed, share_header(self.session, src, self.me))
            )
            self._held[src] = ((x, shamir.decode_y(s_y)), (x, shamir.decode_y(k_y)))
        pairs = {
            v: crypto.agree(
                self._mask.private, self._roster[v][1], self.session, crypto.PURPOSE_MASK
            )
            for v in received.shares
        }
        bits = self.params.field_bits
        add_masks(vec, self._seed, pairs, self.me, bits)
        return MaskedInput(vec, bits)

    # stage 4
    def unmask(self, req: UnmaskRequest) -> UnmaskShares:
        """Shares of survivors' seeds and dropped workers' mask keys, after the checks an
        honest worker makes so that no worker's two secrets are both revealed."""
        self._enter(UNMASK)
        alive, dead = set(req.survivors), set(req.dropped)
        if alive & dead:
            raise ProtocolError(
                f"unmask request lists {sorted(alive & dead)} as both surviving and dropped; "
                "answering would reveal that worker's input"
            )
        if self.me not in alive:
            raise ProtocolError("unmask request does not list this worker as a survivor")
        foreign = (alive | dead) - set(self._held)
        if foreign:
            raise ProtocolError(
                f"unmask request names workers it holds no shares of: {sorted(foreign)}"
            )
        if len(alive) < self.params.threshold:
            raise ProtocolError(
                f"{len(alive)} survivors among its neighbours; the threshold is "
                f"{self.params.threshold}"
            )
        return UnmaskShares(
            {v: self._held[v][0] for v in alive}, {v: self._held[v][1] for v in dead}
        )
