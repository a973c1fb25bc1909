"""Metrics, JSON logs, the health document's Vault section and `keyd status`, on a real OpenBao."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from keyd.ops.dev import free_port
from tests.conftest import base_config
from tests.helpers import ROOT, wait_until

USER = "alice-private-7d3f"


def scrape(http):
    status, headers, body = http.request("GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    return body.decode()


def samples(text):
    """{(name, frozenset(labels)): value} for every sample."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found, name, **labels):
    return found[(name, frozenset(labels.items()))]


def test_metrics_on_the_socket(bao, secret_path, keyd_factory, short_dir):
    path, key = secret_path
    config = base_config(bao, short_dir, path)
    config["grant"] = [{"types": ["user", "signature"]}]
    keyd = keyd_factory(config)
    http = keyd.http()
    for _ in range(3):
        assert http.post_json("/v1/tokens", {"user_id": USER})[0] == 200
    assert http.post_json("/v1/signatures", {"user_id": USER})[0] == 200
    assert http.post_json("/v1/tokens", {"type": "app"})[0] == 403  # no "app" in the grant
    assert http.post_json("/v1/tokens", {"user_id": USER, "ttl": -1})[0] == 422
    assert http.request("GET", f"/v1/{USER}")[0] == 404  # a caller-chosen path never becomes a label
    for garbage in (b"\x16\x03\x01 not http\r\n\r\n", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"):
        with socket.socket(socket.AF_UNIX) as raw:  # rejected by the socket layer: 400, then 414
            raw.settimeout(5)
            raw.connect(keyd.socket)
            raw.sendall(garbage)
            assert raw.recv(65536).startswith(b"HTTP/1.1 4")

    text = scrape(http)
    assert USER not in text and key not in text
    found = samples(text)
    assert value(found, "keyd_tokens_total", app="default", type="user", outcome="issued") == 3
    assert value(found, "keyd_tokens_total", app="default", type="signature", outcome="issued") == 1
    assert value(found, "keyd_tokens_total", app="default", type="app", outcome="refused") == 1
    assert value(found, "keyd_refusals_total", code="forbidden") == 1
    assert value(found, "keyd_refusals_total", code="invalid_field") == 1
    assert value(found, "keyd_refusals_total", code="not_found") == 1
    assert value(found, "keyd_refusals_total", code="bad_request") == 1
    assert value(found, "keyd_refusals_total", code="uri_too_long") == 1
    assert value(found, "keyd_requests_total", endpoint="/v1/tokens", status="200") == 3
    assert value(found, "keyd_requests_total", endpoint="other", status="404") == 1
    count = value(found, "keyd_request_duration_seconds_count", endpoint="/v1/tokens")
    assert count == 5
    assert value(found, "keyd_request_duration_seconds_bucket", endpoint="/v1/tokens", le="+Inf") == 5
    assert value(found, "keyd_app_key_version", app="default") == 1
    assert value(found, "keyd_app_can_sign", app="default") == 1
    assert value(found, "keyd_app_key_stale", app="default") == 0
    assert 0 <= value(found, "keyd_app_seconds_since_refresh", app="default") < 60
    assert 0 < value(found, "keyd_vault_token_ttl_seconds") <= 3600
    assert value(found, "keyd_vault_logged_in") == 1
    assert value(found, "keyd_refresh_failures_total") == 0
    assert value(found, "keyd_connections") >= 1
    assert ("process_resident_memory_bytes", frozenset()) in found
    # Every label value is one keyd chose: app names, types, outcomes, codes, endpoints, numbers.
    for (_, labels), _ in found.items():
        for name, label in labels:
            assert USER not in label and key not in label, (name, label)


def test_metrics_on_loopback_tcp(bao, secret_path, keyd_factory, short_dir):
    path, _ = secret_path
    config = base_config(bao, short_dir, path)
    port = free_port()
    config["metrics"] = {"listen": f"127.0.0.1:{port}"}
    keyd = keyd_factory(config)
    keyd.http().post_json("/v1/tokens", {"user_id": USER})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = samples(text)
    assert value(found, "keyd_tokens_total", app="default", type="user", outcome="issued") == 1
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/tokens", timeout=5)
    assert caught.value.code == 404


def test_health_has_a_vault_section_without_secrets(bao, secret_path, keyd_factory, short_dir):
    path, key = secret_path
    keyd = keyd_factory(base_config(bao, short_dir, path))
    status, doc = keyd.http().get_json("/v1/health")
    assert status == 200
    vault = doc["vault"]
    assert vault["logged_in"] is True and vault["token_renewable"] is True
    assert 3000 < vault["token_ttl_remaining"] <= 3600
    assert vault["login_failures"] == 0 and vault["refresh_failures"] == 0
    assert key not in json.dumps(doc) and keyd.env["VAULT_TOKEN"] not in json.dumps(doc)


def json_lines(keyd):
    lines = []
    for line in keyd.logs().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def events(keyd, name):
    return [line for line in json_lines(keyd) if line.get("event") == name]


def test_json_logs_record_each_event_once(bao, root, secret_path, keyd_factory, short_dir):
    path, key = secret_path
    config = base_config(bao, short_dir, path)
    config["log"] = {"format": "json", "level": "info"}
    keyd = keyd_factory(config)
    wait_until(lambda: events(keyd, "loaded"), what="the 'loaded' log line")
    (loaded,) = events(keyd, "loaded")
    assert loaded["app"] == "default" and loaded["key_version"] == 1 and loaded["level"] == "info"
    assert set(loaded) >= {"time", "level", "logger", "message", "event", "app", "key_version"}

    # Break the secret: several failed attempts (retry_min 0.2 s), one "degraded" line.
    root.secrets.kv.v2.create_or_update_secret(path=path, secret={"wrong": "x"}, mount_point="secret")
    keyd.signal(signal.SIGHUP)
    wait_until(
        lambda: keyd.http().get_json("/v1/health")[1]["apps"]["default"]["refresh_failures"] >= 3,
        timeout=15,
        what="three failed refreshes",
    )
    degraded = events(keyd, "degraded")
    assert len(degraded) == 1
    assert degraded[0]["level"] == "warning" and degraded[0]["key_version"] == 1
    assert "no field 'secret_key'" in degraded[0]["error"]

    # Repair with a new key: one "recovered" and one "rotation" line, with the new version.
    root.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"secret_key": key + "x"}, mount_point="secret"
    )
    keyd.signal(signal.SIGHUP)
    wait_until(lambda: events(keyd, "rotation"), timeout=15, what="the 'rotation' log line")
    (rotation,) = events(keyd, "rotation")
    assert rotation["key_version"] == 3 and rotation["previous_version"] == 1
    assert len(events(keyd, "recovered")) == 1
    keyd.stop()
    text = keyd.logs()
    assert key not in text and keyd.env["VAULT_TOKEN"] not in text
    assert all(isinstance(line["message"], str) for line in json_lines(keyd))


def keyd_status(socket, *args):
    return subprocess.run(
        [sys.executable, "-m", "keyd", "status", "--socket", socket, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )


def test_keyd_status(bao, root, secret_path, keyd_factory, short_dir):
    path, _ = secret_path
    keyd = keyd_factory(base_config(bao, short_dir, path))
    done = keyd_status(keyd.socket)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"keyd at {keyd.socket}: OK")
    assert "app default" in done.stdout and "key v1 (KV v2)" in done.stdout
    assert "Vault token" in done.stdout and "renewable" in done.stdout
    assert "\033[" not in done.stdout  # not a terminal: no colour

    done = keyd_status(keyd.socket, "--json")
    doc = json.loads(done.stdout)
    assert done.returncode == 0 and doc["status"] == "ok" and doc["apps"]["default"]["key_version"] == 1

    root.secrets.kv.v2.create_or_update_secret(path=path, secret={"wrong": "x"}, mount_point="secret")
    keyd.signal(signal.SIGHUP)
    keyd.wait_health(200, field="status", value="degraded")
    done = keyd_status(keyd.socket)
    assert done.returncode == 1
    assert "DEGRADED" in done.stdout and "STALE" in done.stdout and "last error" in done.stdout

    keyd.stop()
    done = keyd_status(keyd.socket)
    assert done.returncode == 2 and "UNREACHABLE" in done.stdout
    done = keyd_status(keyd.socket, "--json")
    assert done.returncode == 2 and json.loads(done.stdout)["status"] == "unreachable"


def test_status_exit_code_while_starting(bao, keyd_factory, short_dir):
    keyd = keyd_factory(base_config(bao, short_dir, "talkjs/never-written"), wait_ready=False)
    keyd.wait_health(503, field="status", value="starting")
    done = keyd_status(keyd.socket)
    assert done.returncode == 1 and "STARTING" in done.stdout and "no key loaded" in done.stdout


def test_metrics_listen_port_in_use_is_a_startup_error(bao, secret_path, keyd_factory, short_dir):
    import socket

    path, _ = secret_path
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = base_config(bao, short_dir, path)
        config["metrics"] = {"listen": f"127.0.0.1:{busy.getsockname()[1]}"}
        keyd = keyd_factory(config, start=False)
        with pytest.raises(AssertionError, match="exited with 2"):
            keyd.start()
    assert "metrics.listen: cannot listen on 127.0.0.1:" in keyd.logs()
    assert not (short_dir / "keyd.sock").exists()


def test_unavailable_is_logged_once(bao, root, secret_path, keyd_factory, short_dir):
    path, _ = secret_path
    config = base_config(bao, short_dir, path)
    config["refresh"]["max_stale"] = "1s"
    config["log"] = {"format": "json"}
    keyd = keyd_factory(config)
    root.secrets.kv.v2.create_or_update_secret(path=path, secret={"wrong": "x"}, mount_point="secret")
    keyd.signal(signal.SIGHUP)
    keyd.wait_health(503, field="status", value="unavailable")
    wait_until(lambda: events(keyd, "unavailable"), timeout=15, what="the 'unavailable' log line")
    failures = keyd.http().get_json("/v1/health")[1]["apps"]["default"]["refresh_failures"]
    wait_until(
        lambda: keyd.http().get_json("/v1/health")[1]["apps"]["default"]["refresh_failures"] >= failures + 2,
        timeout=15,
        what="two more failed refreshes",
    )
    (line,) = events(keyd, "unavailable")
    assert line["level"] == "error" and line["app"] == "default" and line["key_version"] == 1
    assert len(events(keyd, "degraded")) <= 1
