"""Signed keys against an active node. Workers hold Ed25519 identity keys certified by the
authority that authenticates them (an RS256 credential); a node that substitutes, forges,
replays or duplicates public keys in a roster is refused by the honest workers before
they share anything. The node in the core tests is played by hand; the live tests run a
node with worker authentication (uvicorn on loopback, SQLite), the SDK and bad messages.
"""

from __future__ import annotations

import json
import threading

import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gridfl import InvalidRequestError, ProtocolError, Syft, _messages, state
from gridfl.secagg import NodeSession, SecAggParams, WorkerSession
from gridfl.secagg import messages as m
from gridfl.secagg.identity import (
    Identity,
    Verifier,
    issue_credential,
    new_signing_key,
    public_pem,
)
from gridfl.secagg.quantize import decode, encode
from tests.builders import diff_of, host_payload, rsa_key_pair
from tests.harness import Admin, HttpWorker
from tests.secagg._drive import Driver, assert_weighted_mean_step

SESSION = b"gridfl process 1 cycle 1"
IDS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def authority():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _params(n=4):
    # clipping_range chosen so that the scale is 1024: diffs k / 1024 quantize exactly
    cfg = {"threshold": 3, "clipping_range": 32767 / 1024}
    return SecAggParams.from_config(cfg, max_workers=n)


def _workers(authority, ids=IDS, session=SESSION):
    verifier = Verifier(public_pem(authority))
    out = {}
    for u in ids:
        key = new_signing_key()
        me = Identity(key, issue_credential(authority, key, sub=f"user-{u}"))
        out[u] = WorkerSession(_params(), u, session, identity=me, verifier=verifier)
    return out


def _rosters(workers):
    node = NodeSession(_params(), SESSION, 5)
    for u, w in workers.items():
        node.add_keys(u, m.AdvertiseKeys.from_json(w.advertise().to_json()))
    return node, node.close_stage()


def _with(roster: m.Roster, who: str, keys: m.AdvertiseKeys) -> m.Roster:
    return m.Roster({**roster.neighbours, who: keys})


def test_honest_signed_run_gives_the_sum(authority):
    workers = _workers(authority)
    node, rosters = _rosters(workers)
    for u, w in workers.items():
        node.add_shares(u, w.share_keys(m.Roster.from_json(rosters[u].to_json())))
    forwarded = node.close_stage()
    ks = {u: np.arange(4) * 7 - 10 * i for i, u in enumerate(IDS)}
    diffs = {u: [(k / 1024).astype(np.float32)] for u, k in ks.items()}
    for u, w in workers.items():
        node.add_masked(u, w.masked_vector(forwarded[u], encode(diffs[u], 2, w.params)))
    for u, req in node.close_stage().items():
        node.add_unmask(u, workers[u].unmask(req))
    total = node.close_stage()
    p = _params()
    # numpy reference: [sum of weights, sum of weight * k] with weight 2 each
    assert p.scale == 1024 and total[0] == 8
    np.testing.assert_array_equal(total[1:], 2 * np.sum(list(ks.values()), axis=0))
    mean = np.mean(list(ks.values()), axis=0) / 1024  # decode divides by the weight sum
    np.testing.assert_allclose(decode(total, p), mean)


def _forge(authority_or_other, session=SESSION, wid="c"):
    """Keys the node controls, signed by an identity of ``authority_or_other``'s."""
    node_worker = _workers(authority_or_other, [wid], session)[wid]
    return m.AdvertiseKeys.from_json(node_worker.advertise().to_json())


@pytest.mark.parametrize(
    "attack, match",
    [
        ("unsigned", "are not signed"),
        ("own_authority", "not the authority's"),
        ("stolen_signature", "not signed by the identity"),
        ("renamed", "not signed by the identity"),
        ("other_cycle", "not signed by the identity"),
        ("one_identity_twice", "identity of worker .* twice"),
    ],
)
def test_a_node_substituting_keys_is_refused_before_any_share(authority, attack, match):
    workers = _workers(authority)
    _, rosters = _rosters(workers)
    roster = rosters["a"]
    real_c = roster.neighbours["c"]
    if attack == "unsigned":  # the node's own keys, no signature
        fake = _forge(authority)
        bad = _with(roster, "c", m.AdvertiseKeys(fake.cipher_key, fake.mask_key))
    elif attack == "own_authority":  # signed by an identity the node certified itself
        node_authority = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        bad = _with(roster, "c", _forge(node_authority))
    elif attack == "stolen_signature":  # the node's keys under c's signature and credential
        fake = _forge(authority)
        bad = _with(
            roster,
            "c",
            m.AdvertiseKeys(fake.cipher_key, fake.mask_key, real_c.signature, real_c.credential),
        )
    elif attack == "renamed":  # c's genuine advertisement shown as another worker's
        del_c = {k: v for k, v in roster.neighbours.items() if k != "c"}
        bad = m.Roster({**del_c, "e": real_c})
    elif attack == "other_cycle":  # a genuine advertisement of c from another cycle
        bad = _with(roster, "c", _forge(authority, session=b"gridfl process 1 cycle 0"))
    else:  # one certified identity (a colluding worker) signing as two roster entries
        key = new_signing_key()
        me = Identity(key, issue_credential(authority, key, sub="colluder"))
        twin = {}
        for wid in ("c", "e"):
            w = WorkerSession(_params(), wid, SESSION, identity=me)
            twin[wid] = w.advertise()
        bad = m.Roster({**roster.neighbours, **twin})
    with pytest.raises(ProtocolError, match=match):
        workers["a"].share_keys(m.Roster.from_json(bad.to_json()))


def test_the_node_refuses_one_credential_twice_in_a_cycle(authority):
    key = new_signing_key()
    me = Identity(key, issue_credential(authority, key))
    node = NodeSession(_params(), SESSION, 5)
    node.add_keys("x", WorkerSession(_params(), "x", SESSION, identity=me).advertise())
    with pytest.raises(InvalidRequestError, match="credential already advertised"):
        node.add_keys("y", WorkerSession(_params(), "y", SESSION, identity=me).advertise())


# ------------------------------------------------------------------- a live node
@pytest.fixture
def authed(server):
    private, public = rsa_key_pair()
    cfg = {
        "max_workers": 4,
        "max_diffs": 4,
        "authentication": {"pub_key": public},
        "secure_aggregation": {"threshold": 3, "clipping_range": 0.5, "stage_timeout": 5.0},
    }
    admin = Admin(server.url)
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    return server, admin, private, public


def _token(private, sub):
    return jwt.encode({"sub": sub}, private, "RS256")


def test_workers_with_identities_complete_a_cycle_on_an_authenticating_node(authed):
    server, admin, private, public = authed
    out: list = [None] * 4

    def work(i):
        key = new_signing_key()
        try:
            with Syft(
                server.ws_url,
                auth_token=_token(private, f"user-{i}"),
                secagg_identity=Identity(key, issue_credential(private, key, sub=f"user-{i}")),
                secagg_authority=public,
            ) as grid:
                job = grid.new_job("mnist", "1.0")
                job.start()
                assert json.loads(job.protocols["secure_aggregation"])["threshold"] == 3
                out[i] = job.report(state.dumps(diff_of(i)), num_samples=2 + i)
        except BaseException as e:  # noqa: BLE001 - reported below
            out[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [o for o in out if isinstance(o, BaseException)], out
    assert admin.status()["cycles"][0]["status"] == "completed"
    original, new = admin.checkpoint(ref=1), admin.checkpoint()
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    diffs = [diff_of(i) for i in range(4)]
    assert_weighted_mean_step(original, new, diffs, [2, 3, 4, 5], params)


def test_an_authenticating_node_refuses_unsigned_or_misattributed_keys(authed):
    server, admin, private, _ = authed
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    plain = Driver(server.url, params, _token(private, "u1"))
    plain.ok(m.ADVERTISE)  # learns the session
    st, reply = plain.send(m.ADVERTISE, plain.session.advertise().to_json())
    assert st == 400 and "needs signed keys" in reply["error"], reply

    key = new_signing_key()
    as_token = Identity(key, _token(private, "u2"))  # an auth token is not a credential
    d = Driver(server.url, params, _token(private, "u2"), identity=as_token)
    d.ok(m.ADVERTISE)
    st, reply = d.send(m.ADVERTISE, d.session.advertise().to_json())
    assert st == 400 and "not issued by this process's authority" in reply["error"], reply

    # a credential is not an auth token either: forwarding it to neighbours lends nothing
    cred = issue_credential(private, key, sub="u3")
    http = HttpWorker(server.url)
    st, reply = http.call(_messages.AUTHENTICATE, {"model_name": "mnist", "auth_token": cred})
    assert st == 400 and "invalid" in reply["error"], reply

    good = Driver(server.url, params, _token(private, "u4"), identity=Identity(key, cred))
    good.ok(m.ADVERTISE)
    sent = good.session.advertise()
    # signed for another worker id: the node checks the signature too
    forged = m.AdvertiseKeys(sent.cipher_key, sent.mask_key, b"\0" * 64, sent.credential)
    st, reply = good.send(m.ADVERTISE, forged.to_json())
    assert st == 400 and "not signed by the identity" in reply["error"], reply
    st, reply = good.send(m.ADVERTISE, sent.to_json())
    assert st == 200, reply
