"""keyd.refresher against a fake Vault, a fake Scheduler, an injected clock and injected randomness.

The fake scheduler records what the refresher schedules (job id and delay) and runs a pending job
only when a test says so, so no test sleeps to see a refresh, a retry or a renewal, and none reaches
into the refresher's private methods.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Callable

import pytest

from keyd.config import AppConfig, RefreshConfig
from keyd.daemon.backoff import backoff, jittered
from keyd.daemon.keys.keystore import KeyStore, SecretKey
from keyd.daemon.keys.nodes import ProbeResult
from keyd.daemon.keys.refresher import PROBE_JOB, TOKEN_JOB, Refresher, key_job
from keyd.daemon.keys.scheduler import ApScheduler, Job
from keyd.daemon.keys.vault import Secret, TokenInfo, TransitItem
from keyd.errors import (
    KeyUnavailable,
    SecretError,
    VaultAuthError,
    VaultError,
    VaultLoginError,
    VaultUnavailable,
)
from tests.helpers import wait_until

KEY1 = "sk_test_one_one_one_one_one_one_one"
KEY2 = "sk_test_two_two_two_two_two_two_two"


class Clock:
    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeVault:
    """Implements refresher.VaultLike. Queue errors with fail_*; secrets live in `secrets`."""

    def __init__(self, clock: Callable[[], float], ttl: float = 60.0, renewable: bool = True) -> None:
        self.clock = clock
        self.ttl = ttl
        self.renewable = renewable
        self.token: TokenInfo | None = None
        self.secrets: dict[tuple[str, str, str], tuple[str, int]] = {}
        self.login_errors: list[VaultError] = []
        self.renew_errors: list[VaultError] = []
        self.read_errors: list[VaultError] = []
        self.renew_ttl: float | None = None
        self.calls: list[str] = []
        self.on_read: Callable[[], None] | None = None
        self.token_generation = 0
        self.probes: list[ProbeResult] = []  # answers of the next probes (then: serving, no change)
        self.node_failed = False

    def probe(self) -> ProbeResult:
        self.calls.append("probe")
        if self.probes:
            return self.probes.pop(0)
        return ProbeResult(serving=True, newly_serving=())

    def any_node_failed(self) -> bool:
        return self.node_failed

    @property
    def logged_in(self) -> bool:
        return self.token is not None

    def login(self) -> TokenInfo:
        self.calls.append("login")
        if self.login_errors:
            raise self.login_errors.pop(0)
        self.token_generation += 1
        self.token = TokenInfo(ttl=self.ttl, renewable=self.renewable, obtained_at=self.clock())
        return self.token

    def renew(self) -> TokenInfo:
        self.calls.append("renew")
        if self.renew_errors:
            raise self.renew_errors.pop(0)
        ttl = self.ttl if self.renew_ttl is None else self.renew_ttl
        self.token = TokenInfo(ttl=ttl, renewable=self.renewable, obtained_at=self.clock())
        return self.token

    def invalidate(self) -> None:
        self.calls.append("invalidate")
        self.token = None

    def read(self, mount: str, path: str, field: str, kv_version: int) -> Secret:
        self.calls.append(f"read {mount}/{path}#{field}")
        if self.on_read is not None:
            self.on_read()
        if self.read_errors:
            raise self.read_errors.pop(0)
        if (mount, path, field) not in self.secrets:
            raise SecretError(f"reading {mount}/{path}: not found (404)")
        value, version = self.secrets[(mount, path, field)]
        return Secret(value=SecretKey.from_str(value), version=version, kv_version=kv_version)

    def transit_hmac(self, mount: str, key: str, inputs: list[bytes]) -> list[TransitItem]:
        """Transit keys live in ``secrets`` under (mount, key, "transit")."""
        self.calls.append(f"transit {mount}/{key} x{len(inputs)}")
        if self.read_errors:
            raise self.read_errors.pop(0)
        if (mount, key, "transit") not in self.secrets:
            raise SecretError(f"Transit HMAC on {mount}/hmac/{key}/sha2-256: not found (404)")
        value, version = self.secrets[(mount, key, "transit")]
        return [
            TransitItem(digest=hmac.new(value.encode(), data, "sha256").digest(), version=version)
            for data in inputs
        ]


class FakeScheduler:
    """Implements scheduler.Scheduler: one pending run per job id, run when a test asks."""

    def __init__(self) -> None:
        self.pending: dict[str, Job] = {}
        self.scheduled: list[tuple[str, float]] = []  # every (job id, delay) asked for, in order
        self.started = False

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.started = False

    def schedule(self, job_id: str, delay: float, job: Job) -> None:
        self.pending[job_id] = job
        self.scheduled.append((job_id, delay))

    def cancel(self, job_id: str) -> None:
        self.pending.pop(job_id, None)

    def run(self, job_id: str) -> None:
        """Run the pending job ``job_id`` (it is due: the test has moved the clock if it cares)."""
        assert job_id in self.pending, f"{job_id} is not scheduled: {sorted(self.pending)}"
        self.pending.pop(job_id)()


class Harness:
    def __init__(
        self,
        apps: dict[str, AppConfig] | None = None,
        rand: float = 0.5,
        ttl: float = 60.0,
        renewable: bool = True,
        refresh: RefreshConfig | None = None,
    ) -> None:
        self.clock = Clock()
        self.rand = rand
        self.apps = apps or {"default": AppConfig(name="default", app_id="tApp", path="talkjs/live")}
        self.refresh = refresh or RefreshConfig(
            interval=300.0, max_stale=3600.0, retry_min=1.0, retry_max=300.0
        )
        self.vault = FakeVault(self.clock, ttl=ttl, renewable=renewable)
        for app in self.apps.values():
            self.vault.secrets[(app.kv_mount, app.path, app.field)] = (KEY1, 1)
        transit = [name for name, app in self.apps.items() if app.transit]
        self.store = KeyStore(self.apps, self.refresh.max_stale, clock=self.clock, transit=transit)
        self.changes = 0
        self.changed_apps: list[str] = []
        self.scheduler = FakeScheduler()
        self.refresher = Refresher(
            dict(self.apps),
            self.refresh,
            self.vault,
            self.store,
            clock=self.clock,
            rand=lambda: self.rand,
            on_change=self._changed,
            probe_interval=1.0,
            scheduler=self.scheduler,
        )
        self.refresher.start()  # every key job pending at delay 0; nothing has run yet
        assert self.scheduler.started and self.scheduled == [(key_job(n), 0.0) for n in self.apps]
        self.scheduled.clear()

    @property
    def scheduled(self) -> list[tuple[str, float]]:
        return self.scheduler.scheduled

    def run(self, job_id: str) -> None:
        self.scheduler.run(job_id)

    def refresh_job(self, app: str = "default") -> None:
        """The app's scheduled refresh runs (and schedules the next one)."""
        self.run(key_job(app))

    def _changed(self, app: str) -> None:
        self.changes += 1
        self.changed_apps.append(app)

    def last(self, job_id: str) -> float:
        delays = [d for j, d in self.scheduled if j == job_id]
        assert delays, f"{job_id} was never scheduled: {self.scheduled}"
        return delays[-1]

    def key_mac(self, app: str = "default") -> bytes:
        m = self.store.signing(app).signing.hmac()
        m.update(b"x")
        return bytes(m.digest())


def mac_of(key: str) -> bytes:
    return hmac.new(key.encode(), b"x", hashlib.sha256).digest()


# -- backoff and jitter ------------------------------------------------------------------------


@pytest.mark.parametrize("failures", range(1, 60))
@pytest.mark.parametrize("rand", [0.0, 0.3, 0.999999, 1.0])
def test_backoff_stays_between_half_a_second_and_five_minutes(failures: int, rand: float) -> None:
    delay = backoff(failures, 1.0, 300.0, lambda: rand)
    assert 0.5 <= delay <= 300.0


def test_backoff_grows_exponentially_to_the_cap_with_jitter() -> None:
    top = [backoff(n, 1.0, 300.0, lambda: 1.0) for n in range(1, 12)]
    assert top == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    bottom = [backoff(n, 1.0, 300.0, lambda: 0.0) for n in range(1, 12)]
    assert bottom == [t / 2 for t in top]
    assert backoff(10_000, 1.0, 300.0, lambda: 0.0) == 150.0  # huge counts neither overflow nor shrink


def test_backoff_is_never_a_tight_loop_even_at_failure_zero() -> None:
    assert backoff(0, 1.0, 300.0, lambda: 0.0) == 0.5


@pytest.mark.parametrize(("rand", "factor"), [(0.0, 0.9), (0.5, 1.0), (1.0, 1.1)])
def test_interval_jitter_is_ten_percent(rand: float, factor: float) -> None:
    assert jittered(300.0, lambda: rand) == pytest.approx(300.0 * factor)


# -- refresh -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("rand", "expected"), [(0.0, 270.0), (1.0, 330.0)])
def test_success_loads_the_key_and_schedules_the_next_read_at_interval(rand: float, expected: float) -> None:
    h = Harness(rand=rand)
    h.refresh_job()
    assert h.key_mac() == mac_of(KEY1)
    assert h.store.signing("default").version == 1
    assert h.vault.calls == ["login", "read secret/talkjs/live#secret_key"]
    assert h.last("key:default") == pytest.approx(expected)
    assert h.last(TOKEN_JOB) == pytest.approx(40.0)  # renewal at 2/3 of the 60 s TTL
    assert h.changed_apps == ["default"]


def test_failures_back_off_and_keep_the_cached_key() -> None:
    h = Harness(rand=1.0)
    h.refresh_job()
    h.vault.read_errors = [VaultUnavailable("cannot connect to Vault")] * 12
    delays = []
    for _ in range(12):
        h.refresh_job()
        delays.append(h.last("key:default"))
        assert h.key_mac() == mac_of(KEY1)
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    state = h.store.app_health("default")
    assert state.refresh_failures == 12
    assert state.last_error == "cannot connect to Vault"
    assert h.refresher.refresh_failures == 12
    h.refresh_job()
    assert h.last("key:default") == pytest.approx(330.0)  # back to the normal interval
    assert h.store.app_health("default").refresh_failures == 0


def test_first_load_failure_retries_quickly() -> None:
    h = Harness(rand=0.0)
    h.vault.login_errors = [VaultUnavailable("cannot connect to Vault")]
    h.refresh_job()
    assert h.last("key:default") == 0.5
    assert h.refresher.login_failures == 1
    assert h.store.health().status == "starting"
    h.refresh_job()
    assert h.key_mac() == mac_of(KEY1)


def test_rotation_installs_the_new_version() -> None:
    h = Harness()
    h.refresher.refresh_app("default")
    h.vault.secrets[("secret", "talkjs/live", "secret_key")] = (KEY2, 2)
    assert h.refresher.refresh_app("default") is True
    assert h.store.signing("default").version == 2
    assert h.key_mac() == mac_of(KEY2)


def test_bad_secret_keeps_the_last_good_key() -> None:
    h = Harness()
    h.refresher.refresh_app("default")
    h.vault.read_errors = [SecretError("reading secret/talkjs/live: field 'secret_key' is empty")]
    assert h.refresher.refresh_app("default") is False
    assert h.key_mac() == mac_of(KEY1)
    assert "is empty" in (h.store.app_health("default").last_error or "")


def test_403_on_read_logs_in_again_and_retries() -> None:
    h = Harness()
    h.refresher.refresh_app("default")
    h.vault.calls.clear()
    h.vault.secrets[("secret", "talkjs/live", "secret_key")] = (KEY2, 2)
    h.vault.read_errors = [VaultAuthError("reading secret/talkjs/live: permission denied (403)")]
    assert h.refresher.refresh_app("default") is True
    assert h.vault.calls == [
        "read secret/talkjs/live#secret_key",
        "invalidate",
        "login",
        "read secret/talkjs/live#secret_key",
    ]
    assert h.key_mac() == mac_of(KEY2)
    assert h.store.app_health("default").refresh_failures == 0


def test_403_again_after_login_is_a_policy_problem() -> None:
    h = Harness()
    h.refresher.refresh_app("default")
    denied = VaultAuthError("permission denied (403)")
    h.vault.read_errors = [denied, denied]
    assert h.refresher.refresh_app("default") is False
    assert "check keyd's Vault policy" in (h.store.app_health("default").last_error or "")
    assert h.key_mac() == mac_of(KEY1)
    assert h.vault.calls.count("login") == 2  # one re-login, not a loop


def test_failed_relogin_after_403_keeps_the_key() -> None:
    h = Harness()
    h.refresher.refresh_app("default")
    h.vault.read_errors = [VaultAuthError("permission denied (403)")]
    h.vault.login_errors = [VaultLoginError("Vault refused the AppRole login")]
    assert h.refresher.refresh_app("default") is False
    assert h.key_mac() == mac_of(KEY1)
    assert (h.store.app_health("default").last_error or "") == "Vault refused the AppRole login"
    assert h.refresher.login_failures == 1


def test_separate_webhook_key_is_read_too() -> None:
    app = AppConfig(name="default", app_id="tApp", path="talkjs/live", webhook_field="webhook_key")
    h = Harness(apps={"default": app})
    h.vault.secrets[("secret", "talkjs/live", "webhook_key")] = (KEY2, 1)
    h.refresher.refresh_app("default")
    snapshot = h.store.signing("default")
    m = snapshot.webhook.hmac()
    m.update(b"x")
    assert m.digest() == mac_of(KEY2)
    assert h.key_mac() == mac_of(KEY1)


def test_one_app_failing_does_not_touch_another() -> None:
    apps = {
        "a": AppConfig(name="a", app_id="tA", path="talkjs/a"),
        "b": AppConfig(name="b", app_id="tB", path="talkjs/b"),
    }
    h = Harness(apps=apps)
    del h.vault.secrets[("secret", "talkjs/b", "secret_key")]
    h.refresh_job("a")
    h.refresh_job("b")
    assert h.key_mac("a") == mac_of(KEY1)
    assert h.store.app_health("b").refresh_failures == 1
    assert h.last("key:a") == pytest.approx(300.0)
    assert h.last("key:b") == pytest.approx(0.75)


def test_sighup_during_a_read_schedules_another_read_at_once() -> None:
    h = Harness()
    h.vault.on_read = h.refresher.refresh_now
    h.refresh_job()
    # refresh_now scheduled an immediate read, and the run that was under way asks for one too.
    assert [d for j, d in h.scheduled if j == "key:default"] == [0.0, 0.0]
    h.vault.on_read = None
    h.refresh_job()
    assert h.last("key:default") == pytest.approx(300.0)


# -- Vault token renewal -----------------------------------------------------------------------


def test_renewal_at_two_thirds_of_the_ttl() -> None:
    h = Harness(ttl=90.0)
    h.refresher.refresh_app("default")
    assert h.last(TOKEN_JOB) == pytest.approx(60.0)
    h.clock.now += 60.0
    h.vault.calls.clear()
    h.run(TOKEN_JOB)
    assert h.vault.calls == ["renew"]
    assert h.last(TOKEN_JOB) == pytest.approx(60.0)


def test_token_without_ttl_is_never_renewed() -> None:
    h = Harness(ttl=0.0)
    h.refresher.refresh_app("default")
    assert all(j != TOKEN_JOB for j, _ in h.scheduled)


def test_renewal_refused_logs_in_again() -> None:
    h = Harness(ttl=30.0)
    h.refresher.refresh_app("default")
    h.vault.calls.clear()
    h.vault.renew_errors = [VaultAuthError("Vault token renewal: permission denied (403)")]
    h.run(TOKEN_JOB)
    assert h.vault.calls == ["renew", "invalidate", "login"]
    assert h.last(TOKEN_JOB) == pytest.approx(20.0)
    assert h.vault.logged_in


def test_not_renewable_logs_in_again() -> None:
    h = Harness(ttl=30.0, renewable=False)
    h.refresher.refresh_app("default")
    h.vault.calls.clear()
    h.run(TOKEN_JOB)
    assert h.vault.calls == ["invalidate", "login"]


def test_near_max_ttl_logs_in_again() -> None:
    h = Harness(ttl=30.0)
    h.refresher.refresh_app("default")
    h.vault.calls.clear()
    h.vault.renew_ttl = 5.0  # Vault capped the renewal: the token's max TTL is close
    h.run(TOKEN_JOB)
    assert h.vault.calls == ["renew", "invalidate", "login"]
    assert h.vault.token is not None and h.vault.token.ttl == 30.0


def test_failed_renewal_and_login_never_drop_the_key_and_back_off() -> None:
    h = Harness(ttl=30.0, rand=1.0)
    h.refresher.refresh_app("default")
    h.vault.renew_errors = [VaultUnavailable("cannot connect to Vault")]
    h.vault.login_errors = [VaultUnavailable("cannot connect to Vault")] * 3
    h.run(TOKEN_JOB)  # renewal fails with a transient error: retried, no re-login yet
    assert h.last(TOKEN_JOB) == 1.0
    assert h.key_mac() == mac_of(KEY1)
    h.vault.renew_errors = [VaultAuthError("permission denied (403)")]
    delays = []
    for _ in range(4):
        h.run(TOKEN_JOB)
        delays.append(h.last(TOKEN_JOB))
        assert h.key_mac() == mac_of(KEY1)
        assert h.store.signing("default").version == 1
    assert delays[:3] == [2.0, 4.0, 8.0]
    assert delays[3] == pytest.approx(20.0)  # logged in at last: renewal at 2/3 TTL again
    assert h.refresher.login_failures == 3


def test_a_real_scheduler_loads_every_key_on_start() -> None:
    apps = {n: AppConfig(name=n, app_id="t" + n, path=f"talkjs/{n}") for n in ("a", "b")}
    clock = Clock()
    vault = FakeVault(clock)
    for app in apps.values():
        vault.secrets[("secret", app.path, "secret_key")] = (KEY1, 7)
    store = KeyStore(apps, 60.0, clock=clock)
    refresher = Refresher(apps, RefreshConfig(interval=300.0), vault, store, clock=clock)
    refresher.start()
    try:
        wait_until(store.ready, timeout=5, what="both keys loaded")
    finally:
        refresher.stop()
    assert store.signing("a").version == 7 and store.signing("b").version == 7
    assert vault.calls.count("login") == 1


def test_the_apscheduler_adapter_runs_once_by_id_replacing_and_cancelling() -> None:
    scheduler = ApScheduler(workers=2)
    ran: list[str] = []
    done = threading.Event()

    def last() -> None:
        ran.append("last")
        done.set()

    scheduler.start()
    try:
        scheduler.schedule("job", 60.0, lambda: ran.append("replaced"))
        scheduler.schedule("job", 0.0, lambda: ran.append("job"))
        scheduler.schedule("other", 0.1, lambda: ran.append("cancelled"))
        scheduler.cancel("other")
        scheduler.cancel("never scheduled")
        scheduler.schedule("last", 0.3, last)  # due after the cancelled one would have been
        assert done.wait(5)
    finally:
        scheduler.shutdown()
    assert ran == ["job", "last"]
    scheduler.schedule("late", 0.0, lambda: ran.append("late"))  # after shutdown: nothing, no error


# -- policy problems, recovery probes ------------------------------------------------------------


def test_a_403_right_after_a_fresh_login_is_the_policy_and_retries_never_log_in_again() -> None:
    h = Harness()
    denied = VaultAuthError("reading secret/talkjs/live (KV v2) at http://v1: permission denied (403)")
    h.vault.read_errors = [denied] * 10
    for _ in range(5):
        assert h.refresher.refresh_app("default") is False
    assert h.vault.calls.count("login") == 1  # the first refresh's login, then never again
    state = h.store.app_health("default")
    assert state.last_error is not None
    assert state.cause == "permission denied on secret/data/talkjs/live"
    assert "check keyd's Vault policy" in state.last_error and "http://v1" in state.last_error
    # The normal backoff (5 failures in a row: at least 8 s), not a fast loop.
    h.refresh_job()
    assert h.last("key:default") >= h.refresh.retry_min * 8


def test_a_403_with_an_older_token_logs_in_once_then_the_verdict_sticks_to_that_token() -> None:
    h = Harness()
    assert h.refresher.refresh_app("default") is True
    denied = VaultAuthError("permission denied (403)")
    h.vault.read_errors = [denied] * 10
    assert h.refresher.refresh_app("default") is False  # read, re-login, read: policy
    assert h.vault.calls.count("login") == 2
    assert h.refresher.refresh_app("default") is False
    assert h.refresher.refresh_app("default") is False
    assert h.vault.calls.count("login") == 2  # the same token was already refused after its login
    # The policy is fixed: the next read works, and the verdict is forgotten.
    h.vault.read_errors = []
    assert h.refresher.refresh_app("default") is True
    # ... so a later 403 is first taken for a revoked token again: one more login, then the verdict.
    h.vault.read_errors = [denied, denied]
    assert h.refresher.refresh_app("default") is False
    assert h.vault.calls.count("login") == 3


def test_an_expired_token_is_replaced_before_reading() -> None:
    h = Harness(ttl=60.0)
    assert h.refresher.refresh_app("default") is True
    h.vault.calls.clear()
    h.clock.now += 61  # a long outage: the token ran out meanwhile
    assert h.refresher.refresh_app("default") is True
    assert h.vault.calls == ["invalidate", "login", "read secret/talkjs/live#secret_key"]


def probe_harness() -> Harness:
    h = Harness(refresh=RefreshConfig(interval=300.0, max_stale=3600.0, retry_min=1.0, retry_max=300.0))
    h.refresher.refresh_app("default")
    h.vault.read_errors = [VaultUnavailable("no Vault node could serve it", "node unreachable")] * 20
    assert h.refresher.refresh_app("default") is False
    return h


def test_a_failed_refresh_starts_probing_at_jittered_probe_intervals() -> None:
    h = probe_harness()
    assert PROBE_JOB in h.scheduler.pending
    assert h.last(PROBE_JOB) == 0.75  # rand 0.5: three quarters of the interval
    h.vault.probes = [ProbeResult(serving=False, newly_serving=())] * 2
    for rand, delay in ((0.0, 0.5), (1.0, 1.0)):
        h.rand = rand
        h.run(PROBE_JOB)
        assert h.last(PROBE_JOB) == delay


def test_a_node_serving_again_refreshes_failing_apps_at_once_then_backs_off() -> None:
    h = probe_harness()
    h.scheduled.clear()
    # Nothing serves: no refresh is pulled forward, probing goes on.
    h.vault.probes = [ProbeResult(serving=False, newly_serving=())]
    h.run(PROBE_JOB)
    assert [j for j, _ in h.scheduled] == [PROBE_JOB]
    # A node answers healthy: the app is refreshed now (jitter at most a fifth of the interval).
    h.scheduled.clear()
    h.vault.probes = [ProbeResult(serving=True, newly_serving=("https://v2:8200",))]
    h.run(PROBE_JOB)
    assert 0.0 <= h.last("key:default") <= 0.2
    # Still serving, the refresh failed again: not at every probe, but after a growing backoff.
    h.refresher.refresh_app("default")
    h.scheduled.clear()
    h.run(PROBE_JOB)
    assert "key:default" not in [j for j, _ in h.scheduled]
    h.clock.now += 1.0
    h.run(PROBE_JOB)
    assert "key:default" in [j for j, _ in h.scheduled]
    h.scheduled.clear()
    h.clock.now += 1.0
    h.run(PROBE_JOB)
    assert "key:default" not in [j for j, _ in h.scheduled]  # the second wait is longer (1.5 s)
    # Success: the app leaves recovery and probing stops.
    h.vault.read_errors = []
    assert h.refresher.refresh_app("default") is True
    h.scheduled.clear()
    h.run(PROBE_JOB)
    assert h.scheduled == [] and PROBE_JOB not in h.scheduler.pending


def test_probing_goes_on_while_a_node_is_marked_failed_even_if_every_app_signs() -> None:
    h = Harness()
    h.vault.node_failed = True
    assert h.refresher.refresh_app("default") is True
    assert PROBE_JOB in h.scheduler.pending and h.last(PROBE_JOB) > 0
    h.scheduled.clear()
    h.run(PROBE_JOB)
    assert [j for j, _ in h.scheduled] == [PROBE_JOB]  # no refresh: every app is fine
    h.vault.node_failed = False
    h.scheduled.clear()
    h.run(PROBE_JOB)
    assert h.scheduled == [] and PROBE_JOB not in h.scheduler.pending


def test_a_probe_never_pulls_forward_a_refresh_that_is_running() -> None:
    h = probe_harness()
    h.vault.probes = [ProbeResult(serving=True, newly_serving=("https://v1",))]
    during: list[tuple[str, float]] = []

    def probe_while_reading() -> None:
        # The probe job runs on another worker while the app's refresh is reading from Vault.
        h.vault.on_read = None
        h.scheduled.clear()
        h.run(PROBE_JOB)
        during.extend(h.scheduled)

    h.vault.on_read = probe_while_reading
    h.refresh_job()
    assert during and key_job("default") not in [j for j, _ in during]
    assert h.last(key_job("default")) >= 1.0  # the running refresh reschedules itself on its backoff


# -- transit apps: the refresh is a probe HMAC, the snapshot holds no key -------------------------


def _transit_harness() -> Harness:
    app = AppConfig(name="default", app_id="tApp", key_source="transit", transit_key="talkjs")
    h = Harness(apps={"default": app})
    h.vault.secrets[("transit", "talkjs", "transit")] = (KEY1, 3)
    return h


def test_transit_refresh_probes_and_records_the_key_version_without_holding_a_key() -> None:
    h = _transit_harness()
    h.refresh_job()
    assert "transit transit/talkjs x1" in h.vault.calls
    assert not any(call.startswith("read ") for call in h.vault.calls)  # no KV read at all
    state = h.store.app_health("default")
    assert state.can_sign and state.key_version == 3
    snapshot = h.store.signing("default")
    with pytest.raises(KeyUnavailable):
        snapshot.signing.hmac()  # the stand-in never MACs (nothing could sign with an empty key)
    h.vault.secrets[("transit", "talkjs", "transit")] = (KEY2, 4)
    h.clock.now += 300
    h.refresh_job()
    assert h.store.app_health("default").key_version == 4


def test_transit_policy_without_the_hmac_path_names_the_path() -> None:
    h = _transit_harness()
    h.refresh_job()  # logs in
    h.vault.read_errors = [VaultAuthError("permission denied (403)"), VaultAuthError("permission denied (403)")]
    assert h.refresher.refresh_app("default") is False
    error = h.store.app_health("default").last_error or ""
    assert "does not allow update on transit/hmac/talkjs/sha2-256" in error, error


def test_a_failed_transit_batch_probes_the_app_once_and_health_stops_claiming_it_signs() -> None:
    h = _transit_harness()
    h.refresh_job()
    assert h.store.app_health("default").can_sign
    h.scheduled.clear()
    h.refresher.transit_failed("default")  # the batcher saw a call fail
    assert h.scheduled == [(key_job("default"), 0.0)]
    h.vault.read_errors = [VaultUnavailable("Transit HMAC: cannot connect to Vault", "node unreachable")]
    h.refresh_job()
    state = h.store.app_health("default")
    assert not state.can_sign and state.key_source == "transit"  # no stale key to fall back on
    h.scheduled.clear()
    h.refresher.transit_failed("default")  # already failing: the backoff owns the next attempt
    assert (key_job("default"), 0.0) not in h.scheduled
    h.clock.now += 600
    h.refresh_job()
    assert h.store.app_health("default").can_sign
