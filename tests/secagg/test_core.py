"""The pure secure-aggregation core: n simulated workers and a node in process, with
dropouts at every stage. Expected sums are computed here from the quantized inputs with
numpy, independently of the protocol's masking and unmasking."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gridfl import (
    AggregationAbortedError,
    ConfigError,
    ConflictError,
    InvalidRequestError,
    ProtocolError,
)
from gridfl.secagg import NodeSession, SecAggParams, WorkerSession, crypto, shamir
from gridfl.secagg.graph import neighbour_graph
from gridfl.secagg.messages import (
    AdvertiseKeys,
    EncryptedShares,
    MaskedInput,
    Roster,
    UnmaskRequest,
    UnmaskShares,
)
from gridfl.secagg.quantize import decode, encode

SESSION = b"process 7 cycle 3"
STEP = 1024  # quantization steps per unit, a power of two so k / STEP is exact


def params(n: int, threshold: int, neighbours=None, **kw) -> SecAggParams:
    # clipping_range chosen so that scale == STEP exactly
    cfg = {"threshold": threshold, "neighbours": neighbours, "clipping_range": 32767 / STEP}
    return SecAggParams.from_config({**cfg, **kw}, max_workers=n)


class ReloadingNode:
    """A NodeSession stored and reloaded around every call, as the server does between
    messages (any server process may take the next one)."""

    def __init__(self, p, length):
        self.args = (p, SESSION, length)
        self.saved = NodeSession(*self.args).to_state()

    def __getattr__(self, name):
        def call(*a):
            node = NodeSession.from_state(*self.args, *self.saved)
            out = getattr(node, name)(*a)
            self.saved = node.to_state()
            self.last = node
            return out

        return call


def run(p, inputs, weights, drop=None, tamper=None, reload=True):
    """Run the four stages; ``drop[stage]`` = worker ids that go silent at that stage.
    Returns the node's signed sum and its last state, or raises what the node raised."""
    drop = drop or {}
    ids = sorted(inputs)
    workers = {u: WorkerSession(p, u, SESSION) for u in ids}
    length = next(iter(inputs.values())).size + 1
    node: Any = ReloadingNode(p, length) if reload else NodeSession(p, SESSION, length)
    alive = [u for u in ids if u not in drop.get(1, ())]
    for u in alive:
        node.add_keys(u, AdvertiseKeys.from_json(workers[u].advertise().to_json()))
    rosters = node.close_stage()
    alive = [u for u in rosters if u not in drop.get(2, ())]
    for u in alive:
        msg = workers[u].share_keys(Roster.from_json(rosters[u].to_json()))
        node.add_shares(u, EncryptedShares.from_json(msg.to_json()))
    forwarded = node.close_stage()
    alive = [u for u in forwarded if u not in drop.get(3, ())]
    for u in alive:
        vec = encode_exact(inputs[u], weights[u], p)
        msg = workers[u].masked_vector(EncryptedShares.from_json(forwarded[u].to_json()), vec)
        node.add_masked(u, MaskedInput.from_json(msg.to_json(), vec.size, p.field_bits))
    requests = node.close_stage()
    if tamper:
        requests = tamper(requests)
    alive = [u for u in requests if u not in drop.get(4, ())]
    for u in alive:
        msg = workers[u].unmask(UnmaskRequest.from_json(requests[u].to_json()))
        node.add_unmask(u, UnmaskShares.from_json(msg.to_json()))
    return node.close_stage(), node.last if reload else node


def shared(p, ids, length):
    """Workers and a node through stages 1 and 2: ``(workers, node, forwarded shares)``."""
    workers = {u: WorkerSession(p, u, SESSION) for u in ids}
    node = NodeSession(p, SESSION, length)
    for u in ids:
        node.add_keys(u, workers[u].advertise())
    rosters = node.close_stage()
    for u in ids:
        node.add_shares(u, workers[u].share_keys(rosters[u]))
    return workers, node, node.close_stage()


def encode_exact(k: np.ndarray, weight: int, p: SecAggParams) -> np.ndarray:
    """The worker's input for diff ``k / STEP`` through the SDK's encoder."""
    return encode([k.astype(np.float64) / STEP], weight, p)


def make_inputs(n: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"worker-{i:03d}" for i in range(n)]
    inputs = {u: rng.integers(-30000, 30001, length) for u in ids}
    weights = {u: int(rng.integers(1, 500)) for u in ids}
    return inputs, weights


def expected_sum(inputs, weights, survivors):
    """numpy reference: [sum w, sum w * k] over the survivors, in int64."""
    w = np.array([weights[u] for u in survivors], np.int64)
    k = np.stack([inputs[u] for u in survivors]).astype(np.int64)
    return np.concatenate([[w.sum()], (w[:, None] * k).sum(axis=0)])


# ------------------------------------------------------------------- full runs
@pytest.mark.parametrize("neighbours", [None, 4])
@pytest.mark.parametrize("stage", [1, 2, 3, 4])
@pytest.mark.parametrize("dropouts", ["none", "one", "most"])
def test_sum_is_exact_with_dropouts_at_each_stage(neighbours, stage, dropouts):
    """The most dropouts that keep threshold shares in every neighbourhood: n - t with
    plain SecAgg (every worker holds a share of everyone), (k + 1) - t with SecAgg+ k."""
    n = 10
    # plain SecAgg: 10 shares, t = 6; SecAgg+ k = 4: 5 shares, t = 3
    p = params(n, 6 if neighbours is None else 3, neighbours)
    most = n - p.threshold if neighbours is None else neighbours + 1 - p.threshold
    count = {"none": 0, "one": 1, "most": most}[dropouts]
    inputs, weights = make_inputs(n, 50, seed=stage * 10 + count)
    gone = sorted(inputs)[:count]
    total, node = run(p, inputs, weights, drop={stage: gone})
    survivors = [u for u in sorted(inputs) if u not in gone or stage == 4]
    assert sorted(node.masked) == survivors
    np.testing.assert_array_equal(total, expected_sum(inputs, weights, survivors))


def test_secagg_plus_with_100_workers_and_dropouts_at_stages_3_and_4():
    """k = 8, t = 5: any 4 dropouts leave every neighbourhood 5 of its 9 shares."""
    n = 100
    p = params(n, 5, neighbours=8, min_survivors=50)
    inputs, weights = make_inputs(n, 20, seed=5)
    ids = sorted(inputs)
    total, node = run(p, inputs, weights, drop={3: ids[0:2], 4: ids[50:52]})
    assert all(len(node.graph[u]) == 8 for u in node.graph)
    np.testing.assert_array_equal(total, expected_sum(inputs, weights, ids[2:]))


@pytest.mark.parametrize("stage", [2, 3, 4])
def test_plain_secagg_with_100_workers_and_n_minus_t_dropouts(stage):
    n = 100
    p = params(n, 51)
    inputs, weights = make_inputs(n, 8, seed=stage)
    ids = sorted(inputs)
    gone = ids[: n - p.threshold]
    total, _ = run(p, inputs, weights, drop={stage: gone}, reload=False)
    survivors = ids if stage == 4 else ids[n - p.threshold :]
    np.testing.assert_array_equal(total, expected_sum(inputs, weights, survivors))


def test_dequantized_result_is_the_weighted_mean_within_the_bound():
    n, length = 8, 1000
    p = SecAggParams.from_config(
        {"threshold": 5, "clipping_range": 0.5, "quantization_bits": 20}, max_workers=n
    )
    rng = np.random.default_rng(1)
    ids = [f"w{i}" for i in range(n)]
    diffs = {u: rng.normal(0, 0.05, length).astype(np.float32) for u in ids}
    weights = {u: int(rng.integers(1, 100)) for u in ids}
    workers, node, fwd = shared(p, ids, length + 1)
    for u in ids:
        node.add_masked(u, workers[u].masked_input(fwd[u], [diffs[u]], weights[u]))
    reqs = node.close_stage()
    for u in ids:
        node.add_unmask(u, workers[u].unmask(reqs[u]))
    mean = decode(node.close_stage(), p)
    w = np.array([weights[u] for u in ids], np.float64)
    reference = (w[:, None] * np.stack([diffs[u] for u in ids])).sum(0) / w.sum()
    assert np.abs(mean - reference).max() < 1 / p.scale


# ------------------------------------------------------------------- aborts
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fewer_survivors_than_the_threshold_aborts_the_cycle(stage):
    n = 6
    p = params(n, 4)
    inputs, weights = make_inputs(n, 10)
    with pytest.raises(AggregationAbortedError, match="needs 4"):
        run(p, inputs, weights, drop={stage: sorted(inputs)[:3]})


def test_too_few_unmask_answers_aborts_without_a_result():
    p = params(6, 4)
    inputs, weights = make_inputs(6, 10)
    with pytest.raises(AggregationAbortedError, match="shares to unmask"):
        run(p, inputs, weights, drop={4: sorted(inputs)[:3]})


def test_min_survivors_above_the_threshold_is_enforced():
    p = params(8, 5, min_survivors=7)
    inputs, weights = make_inputs(8, 10)
    with pytest.raises(AggregationAbortedError, match="sent masked inputs; it needs 7"):
        run(p, inputs, weights, drop={3: sorted(inputs)[:2]})


# ------------------------------------------------------------------- honest-worker checks
def test_a_worker_listed_as_surviving_and_dropped_is_refused():
    p = params(5, 3)
    inputs, weights = make_inputs(5, 10)

    def both(requests):
        victim = sorted(requests)[1]
        return {
            u: UnmaskRequest(r.survivors, sorted(set(r.dropped) | {victim})) if u != victim else r
            for u, r in requests.items()
        }

    with pytest.raises(ProtocolError, match="both surviving and dropped"):
        run(p, inputs, weights, tamper=both)


def test_a_node_telling_two_groups_different_stories_gets_too_few_shares():
    """A lying node says worker v survived to some neighbours and dropped to the others.
    Each honest worker answers one of the two, and with threshold > half of the shares the
    node never gets threshold shares of both secrets."""
    n = 7
    p = params(n, 4)  # 7 shares per worker; 2 * 4 > 7
    inputs, _weights = make_inputs(n, 10)
    ids = sorted(inputs)
    victim = ids[0]
    workers, node, fwd = shared(p, ids, 11)
    for u in ids:
        node.add_masked(u, workers[u].masked_vector(fwd[u], encode_exact(inputs[u], 1, p)))
    honest = node.close_stage()
    for split_at in range(n):
        answers = []
        for i, u in enumerate(ids[1:]):
            r = honest[u]
            if i >= split_at:  # "victim dropped": ask for its mask key share instead
                r = UnmaskRequest([s for s in r.survivors if s != victim], [victim])
            replay = WorkerSession(p, u, SESSION)  # same worker state, fresh stage counter
            replay.__dict__.update({**workers[u].__dict__, "done": "masked_input"})
            answers.append(replay.unmask(r))
        answers.append(workers[victim].unmask(honest[victim]))  # the victim itself
        seeds = sum(victim in a.seed_shares for a in answers)
        keys = sum(victim in a.key_shares for a in answers)
        assert seeds + keys == n
        assert min(seeds, keys) < p.threshold
        workers[victim].done = "masked_input"


def test_unmask_with_too_few_survivors_or_unknown_ids_is_refused():
    p = params(5, 3)
    inputs, weights = make_inputs(5, 10)
    for bad, match in [
        (lambda r: UnmaskRequest(r.survivors[:1], []), "survivor"),
        (lambda r: UnmaskRequest(r.survivors, [*r.dropped, "stranger"]), "no shares of"),
    ]:
        with pytest.raises(ProtocolError, match=match):
            run(p, inputs, weights, tamper=lambda rs, bad=bad: {u: bad(r) for u, r in rs.items()})


def test_replayed_or_reordered_stages_are_refused():
    p = params(3, 2)
    w = WorkerSession(p, "a", SESSION)
    with pytest.raises(ProtocolError, match="expected 'advertise_keys'"):
        w.share_keys(Roster({}))
    w.advertise()
    with pytest.raises(ProtocolError, match="replayed or reordered"):
        w.advertise()
    with pytest.raises(ProtocolError, match="expected 'share_keys'"):
        w.unmask(UnmaskRequest(["a"], []))


def test_a_share_sealed_for_another_recipient_or_cycle_does_not_open():
    p = params(3, 2)
    ws = {u: WorkerSession(p, u, SESSION) for u in "abc"}
    keys = {u: ws[u].advertise() for u in "abc"}
    sealed = {
        u: ws[u].share_keys(
            Roster({v: keys[v] for v in "abc" if v != u})
        )
        for u in "abc"
    }
    vec = np.zeros(3, np.uint64)
    # c forwards to a what b sealed for c
    with pytest.raises(ProtocolError, match="does not authenticate"):
        ws["a"].masked_vector(EncryptedShares({"b": sealed["b"].shares["c"]}), vec)
    other = WorkerSession(p, "a", b"process 7 cycle 4")
    other.advertise()
    other._cipher = ws["a"]._cipher  # same keys, next cycle: the session still differs
    other.share_keys(Roster({v: keys[v] for v in "bc"}))
    with pytest.raises(ProtocolError, match="does not authenticate"):
        other.masked_vector(EncryptedShares({"b": sealed["b"].shares["a"]}), vec)


# ------------------------------------------------------------------- node bad input
def test_node_refuses_duplicates_wrong_stage_and_wrong_lengths():
    p = params(3, 2)
    ws = {u: WorkerSession(p, u, SESSION) for u in "abc"}
    node = NodeSession(p, SESSION, 5)
    ads = {u: ws[u].advertise() for u in "abc"}
    node.add_keys("a", ads["a"])
    with pytest.raises(ConflictError):
        node.add_keys("a", ads["a"])
    with pytest.raises(InvalidRequestError, match="already advertised"):
        node.add_keys("b", ads["a"])
    node.add_keys("b", ads["b"])
    node.add_keys("c", ads["c"])
    with pytest.raises(InvalidRequestError, match="stage 'advertise_keys'"):
        node.add_masked("a", MaskedInput(np.zeros(5, np.uint64)))
    rosters = node.close_stage()
    with pytest.raises(InvalidRequestError, match="exactly the worker's neighbours"):
        node.add_shares("a", EncryptedShares({}))
    for u in "abc":
        node.add_shares(u, ws[u].share_keys(rosters[u]))
    node.close_stage()
    with pytest.raises(InvalidRequestError, match="5 values"):
        node.add_masked("a", MaskedInput(np.zeros(4, np.uint64)))


def test_malformed_messages_are_refused_with_the_field_named():
    with pytest.raises(ProtocolError, match=r"cipher_key: (expected 32 bytes|an X25519)"):
        AdvertiseKeys.from_json({"cipher_key": "AAAA", "mask_key": "AAAA"})
    with pytest.raises(ProtocolError, match="not below 2\\^20"):  # 3 bytes hold 2^20
        MaskedInput.from_json(MaskedInput(np.array([1 << 20], np.uint64), 24).to_json(), 1, 20)
    with pytest.raises(ProtocolError, match="expected 16 bytes"):
        MaskedInput.from_json(MaskedInput(np.zeros(3, np.uint64)).to_json(), 2, 64)
    with pytest.raises(ProtocolError, match="expected 10 bytes"):  # 40 bits: 5 bytes each
        MaskedInput.from_json(MaskedInput(np.zeros(3, np.uint64), 40).to_json(), 2, 40)
    with pytest.raises(ProtocolError, match="lists a worker twice"):
        UnmaskRequest.from_json({"survivors": ["a", "a"], "dropped": []})
    with pytest.raises(ProtocolError, match="expected"):
        EncryptedShares.from_json({"shares": {"a": "AAAA"}})


# ------------------------------------------------------------------- privacy of the masked vectors
def test_masked_vectors_do_not_correlate_with_the_inputs_and_hide_num_samples():
    n, length = 5, 400_000
    p = SecAggParams.from_config(
        {"threshold": 3, "field_bits": 32, "quantization_bits": 12, "max_num_samples": 1000},
        max_workers=n,
    )
    rng = np.random.default_rng(3)
    ids = [f"w{i}" for i in range(n)]
    ws, _, fwd = shared(p, ids, length + 1)
    for u in ids:
        diff = rng.normal(0, 0.3, length)
        masked = ws[u].masked_input(fwd[u], [diff], 77).vector
        assert masked[0] != 77
        corr = np.corrcoef(masked[1:].astype(np.float64), diff)[0, 1]
        assert abs(corr) < 0.01  # 400,000 samples: the std error of r is 0.0016
        # the same check sees the input through its encoding without the masks
        plain = encode([diff], 77, p)
        assert abs(np.corrcoef(plain[1:].astype(np.float64), diff)[0, 1]) > 0.5


# ------------------------------------------------------------------- primitives
def test_shamir_any_threshold_subset_recovers_and_fewer_do_not():
    rng = np.random.default_rng(0)
    secret = bytes(rng.integers(0, 256, 32, dtype=np.uint8))
    shares = shamir.split(secret, threshold=4, count=7)
    for _ in range(20):
        pick = rng.choice(7, 4, replace=False)
        assert shamir.combine([shares[i] for i in pick], 32) == secret
    # 3 shares: Lagrange gives the value at 0 of the line through them, not f(0)
    try:
        got = shamir.combine(shares[:3], 32)
    except ProtocolError:  # not even a 32-byte value
        got = None
    assert got != secret
    with pytest.raises(ProtocolError, match="distinct"):
        shamir.combine([shares[0], shares[0]], 32)


def test_shamir_shares_lie_on_one_polynomial_of_degree_t_minus_1():
    """Independent of combine(): Newton interpolation through t shares predicts the rest."""
    secret = b"\x01" * 32
    t, shares = 3, shamir.split(b"\x01" * 32, 3, 6)
    p = shamir.PRIME
    # fit the polynomial through the first t shares by Newton's divided differences and
    # evaluate it at the other x values and at 0
    xs, ys = [x for x, _ in shares[:t]], [y for _, y in shares[:t]]
    coef = list(ys)
    for j in range(1, t):
        for i in range(t - 1, j - 1, -1):
            coef[i] = (coef[i] - coef[i - 1]) * pow(xs[i] - xs[i - j], -1, p) % p

    def newton(x):
        acc = coef[-1]
        for i in range(t - 2, -1, -1):
            acc = (acc * (x - xs[i]) + coef[i]) % p
        return acc

    assert all(newton(x) == y for x, y in shares[t:])
    assert newton(0) == int.from_bytes(secret, "big")


def test_mask_prg_is_the_aes_ctr_keystream_reduced_mod_2_to_the_b():
    seed = bytes(range(32))
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    blocks = b"".join(ecb.update(i.to_bytes(16, "big")) for i in range(3))
    words = np.frombuffer(blocks, "<u8")[:5]
    np.testing.assert_array_equal(crypto.mask(seed, 5, 64), words)
    np.testing.assert_array_equal(crypto.mask(seed, 5, 20), words & np.uint64((1 << 20) - 1))
    other = crypto.mask(bytes(31) + b"\x01", 5, 64)
    assert not np.array_equal(other, words)


def test_neighbour_graph_has_k_neighbours_and_is_symmetric():
    ids = [f"w{i}" for i in range(50)]
    for k in (2, 4, 6, 10):
        g = neighbour_graph(ids, k)
        assert all(len(g[u]) == k and u not in g[u] for u in ids)
        assert all(u in g[v] for u in ids for v in g[u])
    assert all(len(v) == 49 for v in neighbour_graph(ids, 60).values())


# ------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "cfg, max_workers, match",
    [
        ({}, 10, "threshold must be an integer"),
        ({"threshold": 3}, None, "needs server_config.max_workers"),
        ({"threshold": 5}, 10, "more than half of the 10 shares"),
        ({"threshold": 2, "neighbours": 4}, 10, "more than half of the 5 shares"),
        ({"threshold": 6, "neighbours": 4}, 10, "more than the 5 shares"),
        ({"threshold": 6, "field_bits": 16}, 10, "overflows a field of 16 bits"),
        ({"threshold": 6, "clipping_range": 0}, 10, "clipping_range must be a number > 0"),
        ({"threshold": 6, "stage_timeout": True}, 10, "stage_timeout"),
        ({"threshold": 6, "min_survivors": 5}, 10, "min_survivors must be an integer in 6..10"),
        ({"threshold": 6, "quantization_bits": 64}, 10, "quantization_bits"),
        ({"threshold": 6, "colour": 1}, 10, "unknown keys"),
        ({"threshold": 1001}, 2000, "more than 1000; set neighbours"),
        ("yes", 10, "must be an object"),
    ],
)
def test_bad_configs_are_refused_with_what_to_do(cfg, max_workers, match):
    with pytest.raises(ConfigError, match=match):
        SecAggParams.from_config(cfg, max_workers=max_workers)


@pytest.mark.parametrize("neighbours", [2, 3, 4, 5])
def test_even_or_odd_neighbour_counts_work_end_to_end(neighbours):
    n = 9
    degree = 2 * -(-neighbours // 2)
    t = degree // 2 + 1
    p = params(n, t, neighbours)
    inputs, weights = make_inputs(n, 5)
    total, node = run(p, inputs, weights, drop={3: sorted(inputs)[:1]})
    assert all(len(v) == degree for v in node.graph.values())
    np.testing.assert_array_equal(total, expected_sum(inputs, weights, sorted(inputs)[1:]))


def test_descriptor_round_trips():
    p = params(10, 6, neighbours=None)
    assert SecAggParams.from_descriptor(p.descriptor_bytes()) == p
    with pytest.raises(ConfigError, match="this worker runs"):
        SecAggParams.from_descriptor({"name": "secure_aggregation", "version": 99})
