"""keyd.daemon.keys.transit.TransitMac with a fake Transit: how inputs are batched, and what fails alone.

The fake's calls are coroutines the test releases one at a time, so "a call in flight" is exact and
nothing here sleeps to see a batch form.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any

import pytest

from keyd.config import AppConfig
from keyd.daemon.keys.transit import TransitMac, TransitStats
from keyd.daemon.keys.vault import TransitItem
from keyd.errors import KeyUnavailable, VaultAuthError, VaultUnavailable

KEY = b"sk_test_transit"
APP = AppConfig(name="default", app_id="tApp", key_source="transit", transit_key="talkjs")


class FakeTransit:
    """Each call waits until the test releases it; answers with HMACs of KEY (or what it is told)."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.gates: list[asyncio.Event] = []
        self.fail: BaseException | None = None
        self.refuse: set[bytes] = set()
        self.hang = False

    async def hmac(self, mount: str, key: str, inputs: list[bytes]) -> list[TransitItem]:
        self.calls.append(inputs)
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.hang:
            await asyncio.sleep(3600)
        return self.transit_hmac(mount, key, inputs)

    def transit_hmac(self, mount: str, key: str, inputs: list[bytes]) -> list[TransitItem]:
        if self.fail is not None:
            raise self.fail
        return [
            TransitItem(error="refused") if data in self.refuse
            else TransitItem(digest=hmac.digest(KEY, data, hashlib.sha256), version=7)
            for data in inputs
        ]

    def release(self) -> None:
        for gate in self.gates:
            gate.set()


def _mac(fake: FakeTransit, **kwargs: Any) -> TransitMac:
    return TransitMac(fake, timeout=kwargs.pop("timeout", 5.0), **kwargs)


def finish(result: TransitItem | KeyUnavailable) -> Any:
    if isinstance(result, KeyUnavailable):
        return ("unavailable", result.message)
    if result.error:
        return ("refused", result.error)
    return (result.digest, result.version)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_inputs_queued_while_a_call_is_in_flight_go_together_in_the_next_call() -> None:
    async def scenario() -> None:
        fake = FakeTransit()
        transit = _mac(fake, max_in_flight=1)
        first = transit.mac(APP, b"a", finish)
        await settle()
        assert fake.calls == [[b"a"]]  # sent on the next loop turn, no timer
        later = [transit.mac(APP, b"b%d" % i, finish) for i in range(5)]
        await settle()
        assert len(fake.calls) == 1  # queued behind the call in flight
        fake.release()
        assert await first == (hmac.digest(KEY, b"a", hashlib.sha256), 7)
        await settle()
        assert fake.calls[1] == [b"b%d" % i for i in range(5)]
        fake.release()
        results = await asyncio.gather(*later)
        assert [r[0] for r in results] == [hmac.digest(KEY, b"b%d" % i, hashlib.sha256) for i in range(5)]

    asyncio.run(scenario())


def test_a_batch_is_bounded_and_the_rest_follows() -> None:
    async def scenario() -> None:
        fake = FakeTransit()
        transit = _mac(fake, max_batch=4, max_in_flight=1)
        futures = [transit.mac(APP, b"%d" % i, finish) for i in range(10)]
        for _ in range(3):
            await settle()
            fake.release()
        await asyncio.gather(*futures)
        assert [len(call) for call in fake.calls] == [4, 4, 2]

    asyncio.run(scenario())


def test_a_refused_item_fails_alone() -> None:
    async def scenario() -> None:
        fake = FakeTransit()
        fake.refuse = {b"bad"}
        transit = _mac(fake)
        futures = [transit.mac(APP, data, finish) for data in (b"x", b"bad", b"y")]
        await settle()
        fake.release()
        x, bad, y = await asyncio.gather(*futures)
        assert bad == ("refused", "refused") and x[1] == 7 and y[1] == 7

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (VaultUnavailable("Transit HMAC on transit/hmac/talkjs/sha2-256: cannot connect to Vault"), "cannot connect"),
        (VaultAuthError("permission denied (403)"), 'path "transit/hmac/talkjs/sha2-256"'),
    ],
)
def test_a_failed_call_fails_every_request_it_carried(error: Exception, expected: str) -> None:
    async def scenario() -> None:
        fake = FakeTransit()
        fake.fail = error
        stats = TransitStats({"default": APP})
        transit = _mac(fake, stats=stats)
        futures = [transit.mac(APP, b"%d" % i, finish) for i in range(3)]
        await settle()
        fake.release()
        for kind, message in await asyncio.gather(*futures):
            assert kind == "unavailable" and expected in message
        assert stats.calls["error"] == 1 and stats.items[("default", "failed")] == 3

    asyncio.run(scenario())


def test_a_stalled_call_times_out_promptly_and_the_next_call_starts() -> None:
    async def scenario() -> None:
        fake = FakeTransit()
        fake.hang = True
        stats = TransitStats({"default": APP})
        transit = _mac(fake, timeout=0.05, stats=stats)
        stalled = transit.mac(APP, b"a", finish)
        await settle()
        fake.release()
        kind, message = await asyncio.wait_for(stalled, 1.0)
        assert kind == "unavailable" and "in time" in message
        fake.hang = False
        again = transit.mac(APP, b"b", finish)
        await settle()
        fake.release()
        assert (await asyncio.wait_for(again, 1.0))[1] == 7
        assert stats.calls["timeout"] == 1 and stats.calls["ok"] == 1
        transit.close()

    asyncio.run(scenario())


def test_a_caller_gone_before_its_batch_leaves_is_not_sent() -> None:
    async def scenario() -> None:
        fake = FakeTransit()
        transit = _mac(fake, max_in_flight=1)
        first = transit.mac(APP, b"a", finish)
        await settle()
        gone = transit.mac(APP, b"gone", finish)
        kept = transit.mac(APP, b"kept", finish)
        gone.cancel()  # its connection closed
        fake.release()
        await first
        await settle()
        fake.release()
        await kept
        assert fake.calls == [[b"a"], [b"kept"]]

    asyncio.run(scenario())


def test_two_calls_may_be_in_flight_and_the_third_waits_for_one() -> None:
    async def scenario() -> None:
        fake = FakeTransit()
        transit = _mac(fake, max_in_flight=2, min_parallel=1)
        first = transit.mac(APP, b"a", finish)
        await settle()
        second = transit.mac(APP, b"b", finish)
        await settle()
        assert fake.calls == [[b"a"], [b"b"]]  # the second went at once, while the first is out
        queued = [transit.mac(APP, b"c", finish), transit.mac(APP, b"d", finish)]
        await settle()
        assert len(fake.calls) == 2  # two in flight: these wait, together
        fake.release()
        await asyncio.gather(first, second)
        await settle()
        assert fake.calls[2] == [b"c", b"d"]
        fake.release()
        await asyncio.gather(*queued)

    asyncio.run(scenario())


def test_a_call_beside_one_in_flight_waits_for_min_parallel_inputs() -> None:
    async def scenario() -> None:
        fake = FakeTransit()
        transit = _mac(fake, max_in_flight=4, min_parallel=3, parallel_after=3600.0)
        first = transit.mac(APP, b"a", finish)
        await settle()
        assert fake.calls == [[b"a"]]  # nothing in flight: out at once, alone
        few = [transit.mac(APP, b"b", finish), transit.mac(APP, b"c", finish)]
        await settle()
        assert len(fake.calls) == 1  # two waiting: not worth a call beside the one out
        third = transit.mac(APP, b"d", finish)
        await settle()
        assert fake.calls[1:] == [[b"b", b"c", b"d"]]  # three: a second call goes out
        late = transit.mac(APP, b"e", finish)
        await settle()
        assert len(fake.calls) == 2
        fake.release()
        await asyncio.gather(first, *few, third)
        await settle()
        assert fake.calls[2:] == [[b"e"]]  # the calls ended: what waited goes out, however few
        fake.release()
        assert (await late)[1] == 7

    asyncio.run(scenario())


def test_a_stalled_call_holds_the_inputs_behind_it_only_parallel_after() -> None:
    """A call in flight that does not come back (a dead keep-alive connection): the few inputs that
    arrive meanwhile go out in a call of their own after parallel_after, not at the stalled call's
    deadline with it (found by review: with min_parallel alone they all got 503)."""

    async def scenario() -> None:
        fake = FakeTransit()
        transit = _mac(fake, timeout=5.0, max_in_flight=4, min_parallel=16, parallel_after=0.02)
        stalled = transit.mac(APP, b"a", finish)
        await settle()
        assert fake.calls == [[b"a"]]
        behind = [transit.mac(APP, b"b", finish), transit.mac(APP, b"c", finish)]
        await settle()
        assert len(fake.calls) == 1  # two inputs: they wait for the call in flight ...
        await asyncio.sleep(0.1)
        assert fake.calls[1:] == [[b"b", b"c"]]  # ... parallel_after at most, then go together
        fake.gates[1].set()  # the second call answers; the first stays stalled
        assert [r[1] for r in await asyncio.gather(*behind)] == [7, 7]
        assert not stalled.done()
        late = transit.mac(APP, b"d", finish)  # one call still in flight: the timer is armed again
        await asyncio.sleep(0.1)
        assert fake.calls[2:] == [[b"d"]]
        fake.release()
        assert (await late)[1] == 7 and (await stalled)[1] == 7
        transit.close()

    asyncio.run(scenario())


def test_inputs_left_behind_a_full_set_of_calls_still_get_the_timer() -> None:
    async def scenario() -> None:
        fake = FakeTransit()
        transit = _mac(fake, max_in_flight=2, min_parallel=16, parallel_after=0.02)
        first = transit.mac(APP, b"a", finish)
        await settle()
        second = transit.mac(APP, b"b", finish)
        await asyncio.sleep(0.1)
        assert fake.calls == [[b"a"], [b"b"]]  # the second went out after parallel_after
        third = transit.mac(APP, b"c", finish)  # two in flight: waits, no timer can help
        await asyncio.sleep(0.1)
        assert len(fake.calls) == 2
        fake.gates[0].set()  # one call ends; one is still out and "c" is one input: the timer again
        await first
        await asyncio.sleep(0.1)
        assert fake.calls[2:] == [[b"c"]]
        fake.release()
        await asyncio.gather(second, third)
        transit.close()

    asyncio.run(scenario())


def test_keyd_status_names_the_transit_mode() -> None:
    from keyd.ops import status

    app = {"key_source": "transit", "key_loaded": True, "can_sign": True, "key_version": 2, "since_last_refresh": 3.0}
    doc = {"status": "ok", "apps": {"default": app}}
    text = status.render(doc, "/run/keyd/keyd.sock")
    assert "transit: key v2 in Vault (keyd holds no copy), last probe 3 s ago" in text
    failing = {**app, "can_sign": False, "refresh_failures": 1, "last_error": "Transit HMAC ...: cannot connect"}
    text = status.render({"status": "unavailable", "apps": {"default": failing}}, "/run/keyd/keyd.sock")
    assert "NOT SIGNING" in text and "cannot connect" in text


# -- the API in transit mode: the same bytes as KV mode, and nothing reaches Vault before the checks


class LocalMacs:
    """api.Macs computing the HMAC here with KEY: every call recorded, answered at once."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.inputs: list[bytes] = []

    def mac(self, app: AppConfig, data: bytes, finish: Any) -> asyncio.Future[Any]:
        self.inputs.append(data)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(finish(TransitItem(digest=hmac.digest(self.key, data, hashlib.sha256), version=3)))
        return future


def _apis(grants: tuple[Any, ...] | None = None) -> tuple[Any, Any, LocalMacs]:
    from keyd.daemon.policy.grants import Policy
    from keyd.daemon.signing.api import Api
    from tests.unit.test_api import ALL_TYPES, FakeKeys, make_config
    from tests.unit.test_api import KEY as API_KEY

    grants = ALL_TYPES if grants is None else grants
    kv = Api(make_config(), FakeKeys(), Policy(grants), clock=lambda: 1_700_000_000.0)
    macs = LocalMacs(API_KEY.encode())  # the key FakeKeys hands KV mode
    transit_config = make_config(default={"key_source": "transit", "transit_key": "talkjs"})
    transit = Api(transit_config, FakeKeys(), Policy(grants), clock=lambda: 1_700_000_000.0, transit=macs)
    return kv, transit, macs


def _answer(api: Any, request: Any) -> Any:
    from keyd.daemon.http.types import Deferred

    async def run() -> Any:
        response = api.handle(request)
        if isinstance(response, Deferred) and response.pending is not None:
            response = await response.pending
        return response

    return asyncio.run(run())


def test_every_endpoint_answers_byte_for_byte_as_kv_mode() -> None:
    from tests.unit.test_api import KEY as API_KEY
    from tests.unit.test_api import request

    kv, transit, macs = _apis()
    stamp = b"1700000000000"
    body = b'{"type":"message.sent"}'
    good = hmac.new(API_KEY.encode(), stamp + b"." + body, hashlib.sha256).hexdigest()
    cases = [
        request(body={"user_id": "alice"}),
        request(body={"user_id": "\u00e9l\u00e8ve \U0001f600", "ttl": 60}),
        request(body={"type": "app", "ttl": 30}),
        request(path=b"/v1/signatures", body={"user_id": "bob"}),
        request(path=b"/v1/signatures", body={"user_id": "bob", "uppercase": True}),
    ]
    for headers in ({b"x-talkjs-signature": good.encode()}, {b"x-talkjs-signature": b"00" * 32}):
        webhook = request(path=b"/v1/webhooks/verify", body=body)
        webhook.headers = {**webhook.headers, b"x-talkjs-timestamp": stamp, **headers}
        cases.append(webhook)
    for case in cases:
        a, b = _answer(kv, case), _answer(transit, case)
        assert (a.status, a.body, a.headers) == (b.status, b.body, b.headers), case
    assert len(macs.inputs) == len(cases)


def test_refused_and_malformed_requests_never_reach_transit() -> None:
    from keyd.config import GrantConfig
    from tests.unit.test_api import request

    _, transit, macs = _apis(grants=(GrantConfig(index=0, uid=999_999, types=("user", "signature")),))
    assert _answer(transit, request(body={"user_id": "alice"})).status == 403  # not this caller's grant
    _, transit, macs = _apis()
    assert _answer(transit, request(body=b"{not json")).status == 400
    assert _answer(transit, request(body={"user_id": "a", "ttl": 10**9})).status == 422
    forged = "eyJhbGciOiJIUzI1NiJ9.x"  # a JWT header: its HMAC would sign a token
    assert _answer(transit, request(path=b"/v1/signatures", body={"user_id": forged})).status == 422
    assert macs.inputs == []
