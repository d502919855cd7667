"""Secure-aggregation rounds end to end, in process: one ``SecAggServer`` and ``n``
``SecAggClient`` driven stage by stage, with dropouts at every stage, the sparse
SecAgg+ graph, small rings, and a coordinator (or a network) that lies, replays or
tampers."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from strategies.secagg import (
    DuplicatePublicKey,
    InvalidMessage,
    InvalidPublicKey,
    ProtocolViolation,
    QuantizationConfig,
    SecAggAborted,
    SecAggClient,
    SecAggServer,
    ShareDecryptionError,
    choose_parameters,
    dequantize_sum,
    error_bound,
    quantize,
)
from strategies.secagg.graph import ring_order
from strategies.secagg.messages import (
    STAGE_ADVERTISE,
    STAGE_MASKED,
    STAGE_SHARE,
    STAGE_UNMASK,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    RevealedShare,
    Roster,
    SecAggResult,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from strategies.secagg.prg import CHUNK_WORDS
from strategies.secagg.quantize import max_levels
from strategies.secagg.shamir import PRIME, lagrange_at_zero

RUN = "run-1"
ROUND = 3

# How far a site gets: it sends nothing (0), only its keys (1), keys and shares (2),
# also its masked input (3), and also its unmask response (4, no dropout).
NOTHING, KEYS, SHARES, MASKED, ALL = range(5)


def names(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


def random_updates(sites: list[str], dimension: int, ring_bits: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    top = 1 << ring_bits
    return {
        s: rng.integers(0, top, size=dimension, dtype=np.uint64).astype(np.uint32) for s in sites
    }


def ring_sum(vectors: list[np.ndarray], ring_bits: int, dimension: int) -> np.ndarray:
    total = np.zeros(dimension, dtype=np.uint64)
    for v in vectors:
        total += v
    return (total % (1 << ring_bits)).astype(np.uint32)


def assert_refused(server: SecAggServer) -> None:
    """After an abort every further call is refused and nothing is left to release."""
    assert server._acc is None  # the accumulator is gone (it was zeroed first)
    calls: list[Callable[[], object]] = [
        lambda: server.receive_keys([]),
        lambda: server.receive_shares([]),
        lambda: server.add_masked_input(MaskedInput(RUN, ROUND, "site-00", np.zeros(0, "u4"))),
        server.unmask_request,
        lambda: server.receive_unmask([]),
    ]
    for call in calls:
        with pytest.raises(ProtocolViolation, match="aborted"):
            call()


@dataclasses.dataclass
class Round:
    server: SecAggServer
    clients: dict[str, SecAggClient]
    updates: dict[str, np.ndarray]
    result: SecAggResult | None = None
    aborted: SecAggAborted | None = None
    u3: tuple[str, ...] = ()


def run_round(
    n: int,
    *,
    k: int,
    t: int,
    dimension: int,
    ring_bits: int = 32,
    reach: dict[str, int] | None = None,
    updates: dict[str, np.ndarray] | None = None,
    graph_seed: bytes | None = None,
) -> Round:
    """Drive a whole round with ``reach[site]`` as each site's dropout point, checking
    the outcome (sum or abort) against what the stage survivor sets imply."""
    sites = names(n)
    reach = reach or dict.fromkeys(sites, ALL)
    if updates is None:
        updates = random_updates(sites, dimension, ring_bits, n * 1000 + dimension)
    server = SecAggServer(
        RUN, ROUND, sites, k=k, t=t, dimension=dimension, ring_bits=ring_bits, graph_seed=graph_seed
    )
    clients = {s: SecAggClient(s, server.setup) for s in sites}
    rnd = Round(server, clients, updates)

    def expect_abort(stage: str, call: Callable[[], object]) -> Round:
        acc = server._acc
        with pytest.raises(SecAggAborted) as info:
            call()
        assert info.value.stage == stage
        if acc is not None:
            assert not acc.any()  # wiped in place: no partial sum survives
        assert_refused(server)
        rnd.aborted = info.value
        return rnd

    # stage 1
    adverts = [clients[s].advertise_keys() for s in sites if reach[s] >= KEYS]
    u1 = sorted(a.site for a in adverts)
    if len(u1) <= t:
        return expect_abort(STAGE_ADVERTISE, lambda: server.receive_keys(adverts))
    roster = server.receive_keys(adverts)
    assert roster.sites == tuple(u1)
    graph = server.graph
    assert graph is not None and graph.sites == tuple(u1)
    # stage 2
    uploads = [clients[s].share_keys(roster) for s in u1 if reach[s] >= SHARES]
    u2 = sorted(up.site for up in uploads)
    for up in uploads:
        assert {b.receiver for b in up.bundles} == graph.of(up.site)
    if len(u2) < t:
        return expect_abort(STAGE_SHARE, lambda: server.receive_shares(uploads))
    deliveries = server.receive_shares(uploads)
    assert sorted(deliveries) == u2
    partners = {u: graph.of(u) & set(u2) for u in u2}
    # stage 3
    u3 = []
    for s in u2:
        if reach[s] < MASKED:
            continue
        if len(partners[s]) < t:  # the site refuses to send an unprotected input
            with pytest.raises(SecAggAborted, match="fewer than"):
                clients[s].masked_input(deliveries[s], updates[s])
            continue
        masked = clients[s].masked_input(deliveries[s], updates[s])
        assert clients[s].partners == tuple(sorted(partners[s]))
        assert masked.values.dtype == np.uint32 and masked.values.shape == (dimension,)
        if ring_bits < 32 and dimension:
            assert int(masked.values.max()) < 1 << ring_bits
        if dimension >= 8 and ring_bits >= 8:
            assert not np.array_equal(masked.values, updates[s])
        server.add_masked_input(masked)
        u3.append(s)
    rnd.u3 = tuple(u3)
    if len(u3) < t:
        return expect_abort(STAGE_MASKED, server.unmask_request)
    request = server.unmask_request()
    dropped = set(u2) - set(u3)
    assert request.survivors == tuple(u3)
    assert request.dropped == tuple(sorted(dropped))
    # stage 4
    u4 = [s for s in u3 if reach[s] >= ALL]
    responses = []
    for s in u4:
        reply = clients[s].unmask(request)
        seed_owners = {sh.owner for sh in reply.seed_shares}
        key_owners = {sh.owner for sh in reply.key_shares}
        assert seed_owners == partners[s] & set(u3)
        assert key_owners == partners[s] & dropped
        assert not seed_owners & key_owners
        responses.append(reply)
    holders = set(u4)
    enough = (
        len(u4) >= t
        and all(len(partners[u] & holders) >= t for u in u3)
        and all(len(partners[v] & holders) >= t for v in dropped if partners[v] & set(u3))
    )
    if not enough:
        rnd = expect_abort(STAGE_UNMASK, lambda: server.receive_unmask(responses))
        assert rnd.aborted is not None
        assert rnd.aborted.reason in ("below_threshold", "too_few_shares")
        return rnd
    result = server.receive_unmask(responses)
    assert result.survivors == tuple(u3) and result.count == len(u3)
    assert result.total.dtype == np.uint32 and result.total.shape == (dimension,)
    assert np.array_equal(result.total, ring_sum([updates[s] for s in u3], ring_bits, dimension))
    assert result.t == t and result.k == graph.k and result.complete_graph == graph.complete
    assert [r.stage for r in result.stages] == [
        STAGE_ADVERTISE,
        STAGE_SHARE,
        STAGE_MASKED,
        STAGE_UNMASK,
    ]
    assert [r.survivors for r in result.stages] == [
        tuple(u1),
        tuple(u2),
        tuple(u3),
        tuple(sorted(u4)),
    ]
    with pytest.raises(ProtocolViolation):  # a round releases its sum once
        server.receive_unmask(responses)
    rnd.result = result
    return rnd


# -- correct sums under random dropouts -------------------------------------------


@st.composite
def rounds(draw: st.DrawFn) -> dict:
    n = draw(st.integers(3, 12))
    sparse = n >= 5 and draw(st.booleans())
    k = draw(st.sampled_from(range(2, n - 1, 2))) if sparse else draw(st.integers(n - 1, n + 2))
    t = draw(st.integers(2, min(k, n - 1)))
    dimension = draw(
        st.one_of(st.integers(0, 40), st.sampled_from([0, 1, CHUNK_WORDS - 1, CHUNK_WORDS + 3]))
    )
    ring_bits = draw(st.one_of(st.just(32), st.integers(1, 31)))
    drops = draw(st.integers(0, n))  # how many sites drop, and where
    reach = dict.fromkeys(names(n), ALL)
    for s in draw(st.permutations(names(n)))[:drops]:
        reach[s] = draw(st.integers(NOTHING, MASKED))
    return {
        "n": n,
        "k": k,
        "t": t,
        "dimension": dimension,
        "ring_bits": ring_bits,
        "reach": reach,
        "graph_seed": draw(st.binary(min_size=32, max_size=32)),
    }


@settings(max_examples=100, deadline=None)
@given(rounds())
def test_any_dropout_pattern_gives_the_exact_sum_or_a_clean_abort(case):
    rnd = run_round(**case)
    assert (rnd.result is None) != (rnd.aborted is None)
    graph = rnd.server.graph
    kind = "sparse" if graph is not None and not graph.complete else "complete"
    event(f"{kind}: {'sum' if rnd.aborted is None else 'abort at ' + rnd.aborted.stage}")


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([4, 6]),
    st.integers(0, 3),
    st.lists(st.sampled_from([KEYS, SHARES, MASKED]), max_size=2),
    st.binary(min_size=32, max_size=32),
)
def test_sparse_graph_with_few_dropouts_gives_the_exact_sum(k, extra_t, drops, seed):
    n = 12
    t = k // 2 + 1 + min(extra_t, k // 2 - 1)  # a secure threshold: k/2 < t <= k
    reach = dict.fromkeys(names(n), ALL)
    for site, where in zip(random.Random(seed).sample(names(n), len(drops)), drops, strict=True):
        reach[site] = where
    rnd = run_round(n, k=k, t=t, dimension=37, reach=reach, graph_seed=seed)
    assert rnd.server.graph is not None and not rnd.server.graph.complete
    assert rnd.server.graph.k == k
    if t <= k - len(drops):  # every secret keeps at least k - len(drops) >= t holders
        assert rnd.result is not None


@pytest.mark.parametrize(
    ("where", "count"),
    [(NOTHING, 1), (KEYS, 2), (SHARES, 2), (MASKED, 2), (NOTHING, 0)],
)
@pytest.mark.parametrize("ring_bits", [32, 13])
def test_dropouts_at_each_stage_with_enough_sites_left(where, count, ring_bits):
    n, t = 8, 4
    reach = dict.fromkeys(names(n), ALL)
    for s in names(n)[2 : 2 + count]:
        reach[s] = where
    rnd = run_round(n, k=n - 1, t=t, dimension=20, ring_bits=ring_bits, reach=reach)
    assert rnd.result is not None
    stage = {NOTHING: 0, KEYS: 1, SHARES: 2, MASKED: 3}[where]
    assert rnd.result.stages[stage].dropped == tuple(names(n)[2 : 2 + count])
    assert all(not r.dropped for i, r in enumerate(rnd.result.stages) if i != stage)


@pytest.mark.parametrize(
    ("where", "stage"),
    [
        (NOTHING, STAGE_ADVERTISE),
        (KEYS, STAGE_SHARE),
        (SHARES, STAGE_MASKED),
        (MASKED, STAGE_UNMASK),
    ],
)
def test_too_many_dropouts_abort_and_release_nothing(where, stage):
    n, t = 7, 4
    reach = dict.fromkeys(names(n), ALL)
    for s in names(n)[:4]:
        reach[s] = where
    rnd = run_round(n, k=n - 1, t=t, dimension=50, reach=reach)
    assert rnd.result is None and rnd.aborted is not None
    assert rnd.aborted.stage == stage
    assert rnd.aborted.reason == "below_threshold"


def test_unmask_abort_for_a_secret_with_too_few_shares():
    # sparse ring (k=4, t=3): the two responders next to a dropped site leave its mask key
    # with fewer than t holders although most sites answer
    n, k, t = 12, 4, 3
    seed = bytes(32)
    ring = ring_order(names(n), seed)
    reach = dict.fromkeys(names(n), ALL)
    reach[ring[0]] = SHARES  # dropped after sharing: its key must be rebuilt
    reach[ring[1]] = MASKED  # two of its four holders do not answer
    reach[ring[2]] = MASKED
    rnd = run_round(n, k=k, t=t, dimension=4, reach=reach, graph_seed=seed)
    assert rnd.aborted is not None and rnd.aborted.reason == "too_few_shares"


@pytest.mark.parametrize("dimension", [0, 1, CHUNK_WORDS, CHUNK_WORDS + 1, 2 * CHUNK_WORDS + 7])
def test_dimensions_around_the_prg_chunk(dimension):
    reach = dict.fromkeys(names(5), ALL)
    reach["site-03"] = SHARES
    rnd = run_round(5, k=4, t=3, dimension=dimension, ring_bits=32, reach=reach)
    assert rnd.result is not None


@settings(max_examples=15, deadline=None)
@given(
    st.integers(3, 10),
    st.integers(0, 60),
    st.integers(4, 32),
    st.floats(0.05, 10.0),
    st.integers(0, 2),
    st.data(),
)
def test_quantized_updates_sum_and_dequantize(n, dimension, ring_bits, r, drops, data):
    """Real updates: quantized at the sites, summed securely, dequantized within bound."""
    levels = max_levels(n, ring_bits)
    if levels < 2:
        return
    cfg = QuantizationConfig(r, levels, ring_bits)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    sites = names(n)
    floats = {s: rng.normal(0.0, r, size=dimension) for s in sites}
    weights = {s: float(rng.uniform(0.0, 1.0)) for s in sites}
    updates = {
        s: quantize(floats[s], cfg, weight=weights[s], seed=rng.bytes(32)).values for s in sites
    }
    reach = dict.fromkeys(sites, ALL)
    for s in sites[: min(drops, n - 3)]:
        reach[s] = MASKED  # sent its masked input, then no unmask response
    rnd = run_round(
        n, k=n - 1, t=2, dimension=dimension, ring_bits=ring_bits, reach=reach, updates=updates
    )
    assert rnd.result is not None
    survivors = rnd.result.survivors
    total = dequantize_sum(rnd.result.total, len(survivors), cfg)
    exact = sum((weights[s] * np.clip(floats[s], -r, r) for s in survivors), np.zeros(dimension))
    assert np.all(np.abs(total - exact) <= error_bound(len(survivors), cfg))


def test_parameters_from_choose_parameters_run_a_round():
    p = choose_parameters(10, 0.1, 0.1)
    reach = dict.fromkeys(names(10), ALL)
    reach["site-04"] = SHARES
    rnd = run_round(10, k=p.k, t=p.t, dimension=9, reach=reach)
    assert rnd.result is not None and rnd.result.complete_graph == p.complete


# -- helpers to drive a round by hand ----------------------------------------------


@dataclasses.dataclass
class Live:
    server: SecAggServer
    clients: dict[str, SecAggClient]
    adverts: list[KeyAdvertisement]
    roster: Roster | None = None
    deliveries: dict[str, ShareDelivery] | None = None
    request: UnmaskRequest | None = None


def start(n: int = 5, *, k: int | None = None, t: int = 3, dimension: int = 6, **kw) -> Live:
    server = SecAggServer(
        RUN, ROUND, names(n), k=n - 1 if k is None else k, t=t, **kw, dimension=dimension
    )
    clients = {s: SecAggClient(s, server.setup) for s in names(n)}
    return Live(server, clients, [c.advertise_keys() for c in clients.values()])


def to_roster(live: Live) -> Live:
    live.roster = live.server.receive_keys(live.adverts)
    return live


def to_deliveries(live: Live, skip: tuple[str, ...] = ()) -> Live:
    to_roster(live)
    assert live.roster is not None
    uploads = [live.clients[s].share_keys(live.roster) for s in live.roster.sites if s not in skip]
    live.deliveries = live.server.receive_shares(uploads)
    return live


def to_request(live: Live, skip_shares: tuple[str, ...] = (), skip_masked: tuple[str, ...] = ()):
    to_deliveries(live, skip_shares)
    assert live.deliveries is not None
    dim = live.server.setup.dimension
    for s, d in live.deliveries.items():
        if s not in skip_masked:
            live.server.add_masked_input(
                live.clients[s].masked_input(d, np.arange(dim, dtype=np.uint32))
            )
    live.request = live.server.unmask_request()
    return live


# -- a site never reveals both shares of one peer ----------------------------------


def test_second_request_classifying_a_peer_differently_reveals_nothing():
    live = to_request(start(5, t=2), skip_masked=("site-04",))
    assert live.request is not None
    assert live.request.dropped == ("site-04",)
    client = live.clients["site-00"]
    first = client.unmask(live.request)
    assert {s.owner for s in first.seed_shares} == {"site-01", "site-02", "site-03"}
    assert {s.owner for s in first.key_shares} == {"site-04"}
    revealed = client.revealed()
    assert revealed == {
        "site-01": "seed",
        "site-02": "seed",
        "site-03": "seed",
        "site-04": "key",
    }
    again = client.unmask(live.request)  # the same request again: the same answer
    assert again == first
    lies = [
        # site-03 now claimed dropped: its key share would join its seed share
        UnmaskRequest(RUN, ROUND, ("site-00", "site-01", "site-02"), ("site-03", "site-04")),
        # site-04 now claimed alive: its seed share would join its key share
        UnmaskRequest(RUN, ROUND, tuple(names(5)), ()),
        # both at once
        UnmaskRequest(RUN, ROUND, ("site-00", "site-01", "site-02", "site-04"), ("site-03",)),
    ]
    for lie in lies:
        with pytest.raises(ProtocolViolation, match="both shares"):
            client.unmask(lie)
        assert client.revealed() == revealed


def test_first_request_decides_even_when_it_marks_a_live_peer_dropped():
    live = to_request(start(5, t=2))
    client = live.clients["site-01"]
    lie = UnmaskRequest(RUN, ROUND, ("site-01", "site-02", "site-03", "site-04"), ("site-00",))
    reply = client.unmask(lie)
    assert [s.owner for s in reply.key_shares] == ["site-00"]
    assert client.revealed()["site-00"] == "key"
    assert live.request is not None
    with pytest.raises(ProtocolViolation, match="both shares"):
        client.unmask(live.request)  # the honest request now would reveal site-00's seed
    assert client.revealed()["site-00"] == "key"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=6, max_size=6), min_size=1, max_size=6))
def test_no_sequence_of_requests_reveals_both_shares(requests):
    """0 = survivor, 1 = dropped, 2 = unlisted, for each of the 6 sites, per request."""
    live = to_request(start(6, t=2), skip_masked=("site-05",))
    client = live.clients["site-00"]
    seeds_out: set[str] = set()
    keys_out: set[str] = set()
    for drawn in requests:
        classes = [0, *drawn[1:]]  # the site itself is always listed as a survivor
        request = UnmaskRequest(
            RUN,
            ROUND,
            tuple(s for s, c in zip(names(6), classes, strict=True) if c == 0),
            tuple(s for s, c in zip(names(6), classes, strict=True) if c == 1),
        )
        before = client.revealed()
        try:
            reply = client.unmask(request)
        except (ProtocolViolation, SecAggAborted):
            assert client.revealed() == before
            continue
        seeds_out |= {s.owner for s in reply.seed_shares}
        keys_out |= {s.owner for s in reply.key_shares}
        assert not seeds_out & keys_out
    assert set(client.revealed()) == seeds_out | keys_out


def test_unmask_requests_the_client_refuses():
    live = to_request(start(5, t=3))
    client = live.clients["site-00"]
    everyone = tuple(names(5))
    bad = [
        (UnmaskRequest(RUN, ROUND, everyone, ("site-01",)), ProtocolViolation, "both as"),
        (UnmaskRequest(RUN, ROUND, everyone[1:], ("site-00",)), ProtocolViolation, "survivor"),
        (UnmaskRequest(RUN, ROUND, everyone[:4], ()), ProtocolViolation, "classify"),
        (UnmaskRequest(RUN, ROUND, everyone[:2], everyone[2:]), SecAggAborted, "fewer than"),
        (UnmaskRequest(RUN, ROUND + 1, everyone, ()), ProtocolViolation, "another run"),
        (UnmaskRequest("run-2", ROUND, everyone, ()), ProtocolViolation, "another run"),
    ]
    for request, error, message in bad:
        with pytest.raises(error, match=message):
            client.unmask(request)
        assert client.revealed() == {}
    fresh = start(5, t=3).clients["site-00"]
    with pytest.raises(ProtocolViolation, match="before its masked input"):
        fresh.unmask(UnmaskRequest(RUN, ROUND, everyone, ()))


# -- replays, other rounds, malicious rosters ----------------------------------------


def test_messages_of_another_run_or_round_are_rejected_by_the_client():
    live = to_deliveries(start(5))
    assert live.roster is not None and live.deliveries is not None
    client = SecAggClient("site-00", live.server.setup)
    advert = client.advertise_keys()
    keys = tuple(advert if a.site == "site-00" else a for a in live.roster.keys)
    roster = dataclasses.replace(live.roster, keys=keys)
    for changed in ({"round_number": ROUND + 1}, {"run_id": "run-2"}):
        with pytest.raises(ProtocolViolation, match="another run or round"):
            client.share_keys(dataclasses.replace(roster, **changed))
    stale = dataclasses.replace(keys[1], round_number=ROUND - 1)
    with pytest.raises(ProtocolViolation, match="another run or round"):
        client.share_keys(dataclasses.replace(roster, keys=(keys[0], stale, *keys[2:])))
    # deliveries and bundles of another round
    c1 = live.clients["site-01"]
    d = live.deliveries["site-01"]
    update = np.zeros(6, np.uint32)
    with pytest.raises(ProtocolViolation, match="another run or round"):
        c1.masked_input(dataclasses.replace(d, round_number=ROUND + 1), update)
    replayed = (dataclasses.replace(d.bundles[0], run_id="run-0"), *d.bundles[1:])
    with pytest.raises(ProtocolViolation, match="another run or round"):
        c1.masked_input(dataclasses.replace(d, bundles=replayed), update)
    with pytest.raises(ProtocolViolation, match="not site-01"):
        c1.masked_input(dataclasses.replace(d, site="site-02"), update)
    c1.masked_input(d, update)  # the genuine delivery still works after the refusals


def test_bundles_of_another_round_do_not_decrypt():
    """A bundle of another round (other keys), even under the current round's labels,
    fails authentication."""
    old = to_deliveries(start(5))
    new = to_deliveries(start(5))
    assert old.deliveries is not None and new.deliveries is not None
    d_new = new.deliveries["site-02"]
    d_old = old.deliveries["site-02"]
    forged = (dataclasses.replace(d_new.bundles[0], ciphertext=d_old.bundles[0].ciphertext),)
    with pytest.raises(ShareDecryptionError):
        new.clients["site-02"].masked_input(
            dataclasses.replace(d_new, bundles=forged + d_new.bundles[1:]), np.zeros(6, "u4")
        )


def test_tampered_and_misrouted_bundles_are_refused():
    live = to_deliveries(start(5))
    assert live.deliveries is not None
    client = live.clients["site-03"]
    d = live.deliveries["site-03"]
    b0 = d.bundles[0]
    update = np.zeros(6, np.uint32)
    flipped = bytearray(b0.ciphertext)
    flipped[20] ^= 0x80
    cases: list[tuple[tuple[EncryptedShares, ...], type[Exception]]] = [
        (
            (dataclasses.replace(b0, ciphertext=bytes(flipped)), *d.bundles[1:]),
            ShareDecryptionError,
        ),
        # claimed to come from another neighbour: keyed for that one, so it fails to decrypt
        (
            (dataclasses.replace(b0, sender=d.bundles[1].sender), *d.bundles[1:]),
            ShareDecryptionError,
        ),
        ((b0, b0, *d.bundles[1:]), ProtocolViolation),  # repeated
        ((dataclasses.replace(b0, receiver="site-04"), *d.bundles[1:]), ProtocolViolation),
        ((dataclasses.replace(b0, sender="site-99"), *d.bundles[1:]), ProtocolViolation),
        (
            (dataclasses.replace(b0, ciphertext=b0.ciphertext[:10]), *d.bundles[1:]),
            ShareDecryptionError,
        ),
    ]
    for bundles, error in cases:
        with pytest.raises(error):
            client.masked_input(dataclasses.replace(d, bundles=bundles), update)
    with pytest.raises(SecAggAborted, match="fewer than"):
        client.masked_input(dataclasses.replace(d, bundles=d.bundles[:2]), update)
    # a bundle for another receiver, relabelled: keyed for that receiver
    other = live.deliveries["site-04"].bundles
    swapped = next(b for b in other if b.sender == b0.sender)
    with pytest.raises(ShareDecryptionError):
        client.masked_input(
            dataclasses.replace(
                d, bundles=(dataclasses.replace(swapped, receiver="site-03"), *d.bundles[1:])
            ),
            update,
        )


def test_bad_updates_are_refused_by_the_client():
    live = to_deliveries(start(5, ring_bits=10))
    assert live.deliveries is not None
    client = live.clients["site-00"]
    d = live.deliveries["site-00"]
    for bad in (
        np.zeros(5, np.uint32),
        np.zeros(7, np.uint32),
        np.zeros(6, np.int64),
        np.zeros((2, 3), np.uint32),
        np.full(6, 1 << 10, np.uint32),
    ):
        with pytest.raises(ProtocolViolation, match="update"):
            client.masked_input(d, bad)


def malicious_rosters(live: Live) -> list[tuple[str, Roster, type[Exception]]]:
    assert live.roster is not None
    roster = live.roster
    me = roster.keys[0]
    assert me.site == "site-00"
    other = roster.keys[1]
    without = Roster(RUN, ROUND, roster.sites[1:], roster.keys[1:])
    substituted = (dataclasses.replace(me, mask_key=other.mask_key), *roster.keys[1:])
    own_enc = (dataclasses.replace(me, encryption_key=me.mask_key), *roster.keys[1:])
    dup_peer = (
        me,
        other,
        dataclasses.replace(roster.keys[2], mask_key=other.mask_key),
        *roster.keys[3:],
    )
    cross_dup = (
        me,
        other,
        dataclasses.replace(roster.keys[2], encryption_key=other.mask_key),
        *roster.keys[3:],
    )
    zero = (me, dataclasses.replace(other, mask_key=bytes(32)), *roster.keys[2:])
    one = (
        me,
        dataclasses.replace(other, encryption_key=(1).to_bytes(32, "little")),
        *roster.keys[2:],
    )
    outsider = dataclasses.replace(other, site="site-99")
    return [
        ("without the site", without, ProtocolViolation),
        (
            "the site's mask key substituted",
            dataclasses.replace(roster, keys=substituted),
            ProtocolViolation,
        ),
        (
            "the site's encryption key substituted",
            dataclasses.replace(roster, keys=own_enc),
            ProtocolViolation,
        ),
        (
            "two peers with one mask key",
            dataclasses.replace(roster, keys=dup_peer),
            DuplicatePublicKey,
        ),
        (
            "a peer's encryption key is another's mask key",
            dataclasses.replace(roster, keys=cross_dup),
            DuplicatePublicKey,
        ),
        ("an all-zero mask key", dataclasses.replace(roster, keys=zero), InvalidPublicKey),
        ("a low-order encryption key", dataclasses.replace(roster, keys=one), InvalidPublicKey),
        (
            "keys out of order",
            dataclasses.replace(roster, keys=roster.keys[::-1]),
            ProtocolViolation,
        ),
        (
            "unsorted sites",
            Roster(RUN, ROUND, roster.sites[::-1], roster.keys[::-1]),
            ProtocolViolation,
        ),
        (
            "a site outside the sample",
            Roster(RUN, ROUND, (*roster.sites[:4], "site-99"), (*roster.keys[:4], outsider)),
            ProtocolViolation,
        ),
        (
            "a repeated site",
            Roster(
                RUN, ROUND, (*roster.sites[:4], roster.sites[3]), (*roster.keys[:4], roster.keys[3])
            ),
            ProtocolViolation,
        ),
    ]


def test_malicious_rosters_are_refused_before_any_share_leaves():
    live = to_roster(start(5))
    client = live.clients["site-00"]
    for what, roster, error in malicious_rosters(live):
        with pytest.raises(error):
            client.share_keys(roster)
        assert client.partners == (), what
    assert live.roster is not None
    upload = client.share_keys(live.roster)  # the genuine roster is still accepted
    assert len(upload.bundles) == 4


def test_client_call_order_is_enforced():
    live = start(5)
    client = live.clients["site-00"]
    with pytest.raises(ProtocolViolation, match="out of order"):
        client.advertise_keys()
    fresh = SecAggClient("site-01", live.server.setup)
    with pytest.raises(ProtocolViolation, match="out of order"):
        fresh.share_keys(Roster(RUN, ROUND, (), ()))
    with pytest.raises(ProtocolViolation, match="out of order"):
        fresh.masked_input(ShareDelivery(RUN, ROUND, "site-01", ()), np.zeros(6, "u4"))
    with pytest.raises(ProtocolViolation, match="not sampled"):
        SecAggClient("site-99", live.server.setup)
    with pytest.raises(ValueError, match="seed"):
        SecAggClient("site-01", live.server.setup, self_seed=bytes(31))


# -- the server's checks -----------------------------------------------------------


def test_server_rejects_bad_advertisements():
    live = start(7, t=3)
    a = {x.site: x for x in live.adverts}
    stale = dataclasses.replace(a["site-01"], round_number=ROUND + 1)
    adverts = [
        a["site-00"],
        stale,  # another round: rejected, and the genuine one after it is a repeat
        a["site-01"],
        a["site-02"],
        a["site-02"],  # the same message twice
        dataclasses.replace(a["site-03"], mask_key=a["site-04"].mask_key),  # copied key
        a["site-04"],
        dataclasses.replace(a["site-05"], encryption_key=bytes(32)),  # low-order
        a["site-06"],
        dataclasses.replace(a["site-06"], site="site-99"),  # not sampled
    ]
    live.adverts = adverts
    with pytest.raises(SecAggAborted, match="advertise_keys"):
        to_roster(live)  # only site-00 and site-06 remain: fewer than t + 1
    record = live.server.stages[0]
    assert record.survivors == ("site-00", "site-06")
    assert dict(record.rejected) == {
        "site-01": "duplicate_message",
        "site-02": "duplicate_message",
        "site-03": "duplicate_public_key",
        "site-04": "duplicate_public_key",
        "site-05": "invalid_public_key",
        "site-99": "wrong_round_or_site",
    }
    assert_refused(live.server)


def test_server_rejects_a_site_reusing_its_own_key_and_bad_commitments():
    live = start(6, t=2)
    a = {x.site: x for x in live.adverts}
    live.adverts = [
        dataclasses.replace(a["site-00"], encryption_key=a["site-00"].mask_key),
        dataclasses.replace(a["site-01"], seed_commitment=b"short"),
        *[a[s] for s in names(6)[2:]],
    ]
    to_roster(live)
    assert live.roster is not None and live.roster.sites == tuple(names(6)[2:])
    assert dict(live.server.stages[0].rejected) == {
        "site-00": "duplicate_public_key",
        "site-01": "bad_commitment",
    }


def test_server_rejects_bad_share_uploads():
    live = to_roster(start(6, t=3))
    assert live.roster is not None
    uploads = {s: live.clients[s].share_keys(live.roster) for s in live.roster.sites}
    u = uploads
    msgs = [
        u["site-00"],
        u["site-00"],  # twice: both dropped
        dataclasses.replace(u["site-01"], bundles=u["site-01"].bundles[1:]),  # one missing
        dataclasses.replace(u["site-02"], round_number=ROUND + 1),
        dataclasses.replace(
            u["site-03"],
            bundles=(
                dataclasses.replace(u["site-03"].bundles[0], sender="site-05"),
                *u["site-03"].bundles[1:],
            ),
        ),
        dataclasses.replace(
            u["site-04"],
            bundles=(
                dataclasses.replace(u["site-04"].bundles[0], ciphertext=b""),
                *u["site-04"].bundles[1:],
            ),
        ),
        u["site-05"],
    ]
    with pytest.raises(SecAggAborted, match="share_keys"):
        live.server.receive_shares(msgs)
    assert dict(live.server.stages[1].rejected) == {
        "site-00": "duplicate_message",
        "site-01": "malformed_shares",
        "site-02": "wrong_round_or_site",
        "site-03": "malformed_shares",
        "site-04": "malformed_shares",
    }
    assert live.server.stages[1].survivors == ("site-05",)


def test_server_rejects_bad_masked_inputs():
    n, dim = 6, 9
    live = to_deliveries(start(n, t=3, dimension=dim, ring_bits=16))
    assert live.deliveries is not None
    updates = random_updates(names(n), dim, 16, 7)
    masked = {s: live.clients[s].masked_input(live.deliveries[s], updates[s]) for s in names(n)}
    server = live.server
    server.add_masked_input(masked["site-00"])
    with pytest.raises(InvalidMessage, match="duplicate_message"):
        server.add_masked_input(masked["site-00"])
    with pytest.raises(InvalidMessage, match="duplicate_message"):  # even a changed repeat
        server.add_masked_input(dataclasses.replace(masked["site-00"], values=np.zeros(dim, "u4")))
    bad = [
        ("site-01", {"values": masked["site-01"].values[:-1]}, "bad_vector"),
        ("site-02", {"values": masked["site-02"].values.astype(np.int64)}, "bad_vector"),
        ("site-03", {"values": masked["site-03"].values | np.uint32(1 << 16)}, "out_of_ring"),
    ]
    for site, change, reason in bad:
        with pytest.raises(InvalidMessage, match=reason):
            server.add_masked_input(dataclasses.replace(masked[site], **change))
        with pytest.raises(InvalidMessage, match="duplicate_message"):  # no second chance
            server.add_masked_input(masked[site])
    with pytest.raises(InvalidMessage, match="wrong_round_or_site"):
        server.add_masked_input(dataclasses.replace(masked["site-04"], round_number=ROUND + 1))
    with pytest.raises(InvalidMessage, match="wrong_round_or_site"):
        server.add_masked_input(dataclasses.replace(masked["site-04"], site="site-99"))
    server.add_masked_input(masked["site-05"])
    acc = server._acc
    assert acc is not None and acc.any()
    # the rejected sites count as dropped: two survivors < t = 3, so the round aborts
    with pytest.raises(SecAggAborted, match="masked_input"):
        server.unmask_request()
    assert not acc.any()
    assert_refused(server)
    assert server.stages[2].survivors == ("site-00", "site-05")
    assert dict(server.stages[2].rejected) == {
        "site-01": "bad_vector",
        "site-02": "bad_vector",
        "site-03": "out_of_ring",
        "site-04": "wrong_round_or_site",
    }


def test_rejected_masked_inputs_count_as_dropouts_and_the_sum_is_exact():
    n, dim = 6, 9
    live = to_deliveries(start(n, t=3, dimension=dim, ring_bits=16))
    assert live.deliveries is not None
    updates = random_updates(names(n), dim, 16, 8)
    masked = {s: live.clients[s].masked_input(live.deliveries[s], updates[s]) for s in names(n)}
    server = live.server
    for s in names(n):
        if s == "site-02":
            with pytest.raises(InvalidMessage):
                server.add_masked_input(dataclasses.replace(masked[s], values=masked[s].values[1:]))
        else:
            server.add_masked_input(masked[s])
    with pytest.raises(InvalidMessage):
        server.add_masked_input(masked["site-01"])  # a replay adds nothing
    request = server.unmask_request()
    assert request.dropped == ("site-02",)
    replies = [live.clients[s].unmask(request) for s in request.survivors]
    result = server.receive_unmask(replies)
    survivors = [s for s in names(n) if s != "site-02"]
    assert np.array_equal(result.total, ring_sum([updates[s] for s in survivors], 16, dim))


def test_server_rejects_bad_unmask_responses():
    live = to_request(start(6, t=3), skip_masked=("site-05",))
    assert live.request is not None
    server = live.server
    replies = {s: live.clients[s].unmask(live.request) for s in live.request.survivors}
    r0 = replies["site-00"]
    both = dataclasses.replace(
        replies["site-01"],
        key_shares=(
            *replies["site-01"].key_shares,
            RevealedShare("site-02", *_xy(replies["site-01"], "site-02")),
        ),
    )
    seed_of_dropped = dataclasses.replace(
        replies["site-02"],
        seed_shares=(*replies["site-02"].seed_shares, RevealedShare("site-05", 3, bytes(64))),
    )
    wrong_x = dataclasses.replace(
        replies["site-03"],
        seed_shares=tuple(
            dataclasses.replace(s, x=s.x + 1) for s in replies["site-03"].seed_shares
        ),
    )
    msgs = [
        r0,
        r0,  # repeated
        both,
        seed_of_dropped,
        wrong_x,
        dataclasses.replace(replies["site-04"], run_id="run-2"),
    ]
    acc = server._acc
    with pytest.raises(SecAggAborted, match="unmask"):
        server.receive_unmask(msgs)
    assert dict(server.stages[3].rejected) == {
        "site-00": "duplicate_message",
        "site-01": "malformed_response",
        "site-02": "malformed_response",
        "site-03": "malformed_response",
        "site-04": "wrong_round_or_site",
    }
    assert acc is not None and not acc.any()
    assert_refused(server)


def _xy(reply: UnmaskResponse, owner: str) -> tuple[int, bytes]:
    share = next(s for s in reply.seed_shares if s.owner == owner)
    return share.x, share.y


def _shift_chunk_zero(live: Live, replies: dict[str, UnmaskResponse], owner: str, kind: str):
    """Forge the share ``kind`` of ``owner`` held by the first responder the server will
    use, so the rebuilt secret's first chunk moves by exactly +1: Shamir accepts it, only
    the server's verification can catch it."""
    server = live.server
    assert server.graph is not None
    t = server.setup.t
    holders = [s for s in sorted(replies) if owner in server.graph.of(s)][:t]
    xs = [server.graph.index(h) for h in holders]
    lam = int(lagrange_at_zero(np.array([xs], dtype=np.int64))[0, 0])
    reply = replies[holders[0]]
    field = "seed_shares" if kind == "seed" else "key_shares"
    forged = []
    for sh in getattr(reply, field):
        if sh.owner == owner:
            y = np.frombuffer(sh.y, "<u4").astype(np.int64)
            y[0] = (y[0] + pow(lam, PRIME - 2, PRIME)) % PRIME
            sh = dataclasses.replace(sh, y=y.astype("<u4").tobytes())
        forged.append(sh)
    replies[holders[0]] = dataclasses.replace(reply, **{field: tuple(forged)})


@pytest.mark.parametrize("kind", ["seed", "key"])
def test_forged_shares_that_pass_shamir_are_caught_by_verification(kind):
    n = 6
    server = SecAggServer(RUN, ROUND, names(n), k=n - 1, t=3, dimension=5)
    # a zero self-mask seed: +1 on its first chunk stays a valid 16-bit chunk
    clients = {s: SecAggClient(s, server.setup, self_seed=bytes(32)) for s in names(n)}
    live = Live(server, clients, [c.advertise_keys() for c in clients.values()])
    to_request(live, skip_masked=("site-05",))
    assert live.request is not None
    replies = {s: clients[s].unmask(live.request) for s in live.request.survivors}
    _shift_chunk_zero(live, replies, "site-01" if kind == "seed" else "site-05", kind)
    acc = server._acc
    with pytest.raises(SecAggAborted) as info:
        server.receive_unmask(list(replies.values()))
    assert info.value.reason == "reconstruction_failed"
    assert acc is not None and not acc.any()
    assert_refused(server)


def test_corrupted_shares_abort_the_round():
    live = to_request(start(5, t=3))
    assert live.request is not None
    replies = [live.clients[s].unmask(live.request) for s in live.request.survivors]
    r = replies[0]
    noisy = tuple(
        dataclasses.replace(s, y=(np.arange(16, dtype="<u4") * 12345 + 7).tobytes())
        for s in r.seed_shares
    )
    replies[0] = dataclasses.replace(r, seed_shares=noisy)
    with pytest.raises(SecAggAborted) as info:
        live.server.receive_unmask(replies)
    assert info.value.reason == "reconstruction_failed"
    assert_refused(live.server)


def test_server_stage_order_is_enforced():
    live = start(5)
    server = live.server
    with pytest.raises(ProtocolViolation, match="expected stage"):
        server.receive_shares([])
    with pytest.raises(ProtocolViolation, match="expected stage"):
        server.unmask_request()
    to_roster(live)
    with pytest.raises(ProtocolViolation, match="expected stage"):
        server.receive_keys(live.adverts)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sites": ["a", "b"], "k": 1, "t": 2},
        {"sites": ["a", "b", "b", "c"], "k": 3, "t": 2},
        {"sites": ["a", "b", "c"], "k": 2, "t": 1},
        {"sites": ["a", "b", "c"], "k": 2, "t": 3},
        {"sites": names(8), "k": 4, "t": 5},
        {"sites": names(8), "k": 3, "t": 2},
        {"sites": names(5), "k": 4, "t": 3, "ring_bits": 0},
        {"sites": names(5), "k": 4, "t": 3, "ring_bits": 33},
        {"sites": names(5), "k": 4, "t": 3, "dimension": -1},
        {"sites": names(5), "k": 4, "t": 3, "graph_seed": bytes(16)},
    ],
)
def test_server_refuses_impossible_setups(kwargs):
    args = {"dimension": 4, **kwargs}
    with pytest.raises(ProtocolViolation):
        SecAggServer(RUN, ROUND, args.pop("sites"), **args)
