"""keyd.bench: the load generator's bookkeeping and HTTP framing, the requests each target is asked,
Transit key wrapping, the reference server, the in-process harness and the CLI options.

No timing is asserted here: numbers come from `keyd bench` runs (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from keyd import cli
from keyd.bench import command as bench_command
from keyd.bench import compare, load, report, stack, workload
from keyd.bench import inprocess as bench_inprocess
from keyd.bench.options import BenchError
from keyd.ops import transit_import


def test_percentile_is_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert report.percentile(values, 0.50) == 50.0
    assert report.percentile(values, 0.99) == 99.0
    assert report.percentile(values, 1.0) == 100.0
    assert report.percentile([7.0], 0.99) == 7.0
    assert report.percentile([], 0.5) == 0.0


def test_result_counts_every_non_200_and_connection_error() -> None:
    result = report.Result.from_latencies("x", [0.001, 0.002, 0.003], 1.5, {200: 2, 503: 1}, errors=4)
    assert result.requests == 3
    assert result.non_200 == 5
    assert result.throughput == 2.0
    assert result.max_ms == pytest.approx(3.0)
    doc = result.to_json()
    assert doc["statuses"] == {"200": 2, "503": 1}
    assert doc["latency_ms"]["p50"] == pytest.approx(2.0)


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


def test_client_parses_answers_split_across_reads_and_sends_the_next_request() -> None:
    loop = asyncio.new_event_loop()
    try:
        run = load._Load(loop, load.Endpoint(unix="/nowhere"), [b"REQ"], total=2, seconds=None, concurrency=1)
        client = load._Client(run)
        transport = _Transport()
        client.connection_made(transport)
        assert transport.written == [b"REQ"]
        answer = b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"token":1}'
        client.data_received(answer[:20])
        client.data_received(answer[20:-3])
        assert run.statuses == {}
        client.data_received(answer[-3:])
        assert run.statuses == {200: 1}
        assert transport.written == [b"REQ", b"REQ"]
        client.data_received(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}")
        assert run.statuses == {200: 1, 503: 1}
        assert transport.closed, "the run is over after two requests"
        assert len(run.latencies) == 2
    finally:
        loop.close()


def _one_client(total: int) -> tuple[asyncio.AbstractEventLoop, load._Load, load._Client, _Transport]:
    loop = asyncio.new_event_loop()
    run = load._Load(loop, load.Endpoint(unix="/nowhere"), [b"REQ"], total=total, seconds=None, concurrency=1)
    client = load._Client(run)
    transport = _Transport()
    client.connection_made(transport)
    return loop, run, client, transport


def test_client_frames_lower_case_lengths_chunked_bodies_and_bodiless_answers() -> None:
    loop, run, client, transport = _one_client(total=4)
    try:
        client.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{")
        assert run.statuses == {}
        client.data_received(b"}")
        chunked = b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n"
        client.data_received(chunked)
        assert run.statuses == {200: 1}, "a chunked body is complete only with its last chunk"
        client.data_received(b"0\r\n\r\n")
        client.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert run.statuses == {200: 1, 202: 1, 204: 1}
        assert len(transport.written) == 4 and not transport.closed
    finally:
        loop.close()


def test_client_closes_when_told_and_drops_a_malformed_answer_as_an_error() -> None:
    loop, run, client, transport = _one_client(total=10)
    try:
        client.data_received(b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        assert run.statuses == {503: 1} and transport.closed
        run.remaining = 0  # end the run here, so the connection is not reopened
        client.connection_lost(None)
        assert run.errors == 0, "closed by the server after an answer: not an error"
    finally:
        loop.close()
    loop, run, client, transport = _one_client(total=10)
    try:
        client.data_received(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        assert transport.closed and run.statuses == {}
        run.remaining = 0
        client.connection_lost(None)
        assert run.errors == 1
    finally:
        loop.close()


def test_requests_are_well_formed_http() -> None:
    requests = workload.keyd_requests("user")
    assert len(requests) == workload.USER_IDS
    head, _, body = requests[3].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/tokens HTTP/1.1\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body) == {"user_id": "user-00003"}
    assert json.loads(workload.keyd_requests("app")[0].partition(b"\r\n\r\n")[2]) == {"type": "app"}


def test_transit_requests_ask_for_the_hmac_of_the_jwt_signing_input() -> None:
    [request] = compare.transit_requests("http://127.0.0.1:8200", "tok", "transit", "talkjs", "app")
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/transit/hmac/talkjs/sha2-256 HTTP/1.1\r\nHost: 127.0.0.1:8200\r\n")
    signing_input = base64.b64decode(json.loads(body)["input"])
    token = (signing_input + b"." + workload.b64url(hmac.digest(b"k" * 32, signing_input, "sha256"))).decode()
    claims = jwt.decode(token, b"k" * 32, algorithms=["HS256"], issuer=workload.APP_ID)
    assert claims["tokenType"] == "app"


def test_wrap_for_import_is_rsa_oaep_sha256_then_aes_kwp() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key = b"sk_test_" + os.urandom(20)
    blob = base64.b64decode(transit_import.wrap_for_import(key, pem.decode()))
    size = private.key_size // 8
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    ephemeral = private.decrypt(blob[:size], oaep)
    assert len(ephemeral) == 32
    assert aes_key_unwrap_with_padding(ephemeral, blob[size:]) == key


def test_cli_options_map_onto_bench_options() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(
        ["bench", "--socket", "/s", "--concurrency", "8", "--duration", "2s", "--compare"]
    )
    assert (args.socket, args.concurrency, args.duration, args.requests, args.compare) == (
        "/s",
        8,
        2.0,
        None,
        True,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--requests", "10", "--duration", "1s"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--concurrency", "0"])


def test_load_against_the_reference_server_counts_every_answer(tmp_path: Path) -> None:
    """End to end on a real Unix socket: the reference server in its own process, the client here."""
    path = str(tmp_path / "ref.sock")
    server = subprocess.Popen(
        [sys.executable, "-c", f"from keyd.bench.reference import serve_reference; serve_reference({path!r})"]
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        meter = stack.CpuMeter({"client": (os.getpid(), False), "reference": (server.pid, False)})
        result = asyncio.run(
            load.run_load(
                "ref", load.Endpoint(unix=path), workload.keyd_requests(), 4, total=3000, warmup=0, meter=meter
            )
        )
    finally:
        server.terminate()
        server.wait(10)
    assert result.requests == 3000
    assert result.statuses == {200: 3000}
    assert result.non_200 == 0
    assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms
    # Both sides did work for each request (clock ticks are 10 ms: 3000 round trips take several).
    assert set(result.cpu_us) == {"client", "reference"} and all(us > 0 for us in result.cpu_us.values())
    assert "cpu/req µs: client" in result.line()
    assert result.to_json()["cpu_us_per_request"].keys() == {"client", "reference"}


def test_cpu_meter_counts_a_process_group_and_a_gone_process_as_nothing() -> None:
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    # A session leader that, when told, runs a CPU-burning child in its process group, then idles.
    leader_code = (
        "import subprocess, sys, time\nsys.stdin.readline()\n"
        f"child = subprocess.Popen([sys.executable, '-c', {burn!r} + 'time.sleep(30)'])\n"
        "time.sleep(0.1)\n"
        "while True:\n"
        "    ticks = open(f'/proc/{child.pid}/stat').read().rpartition(')')[2].split()\n"
        "    if int(ticks[11]) + int(ticks[12]) >= 28: break\n"
        "    time.sleep(0.02)\n"
        "print('burnt', flush=True)\ntime.sleep(30)\n"
    )
    leader = subprocess.Popen(
        [sys.executable, "-c", leader_code], start_new_session=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert leader.stdin is not None and leader.stdout is not None
        time.sleep(0.3)  # its own start-up is done before the meter starts
        meter = stack.CpuMeter({"alone": (leader.pid, False), "group": (leader.pid, True)})
        meter.start()
        leader.stdin.write(b"go\n")
        leader.stdin.flush()
        assert leader.stdout.readline() == b"burnt\n"
        used = meter.stop()
    finally:
        os.killpg(leader.pid, 9)
        leader.wait()
    assert used["alone"] < 0.2 and used["group"] >= used["alone"] + 0.25, used
    assert stack.cpu_seconds(leader.pid) == 0.0  # reaped: a gone process counts as nothing


def test_a_dead_socket_ends_the_run_with_connection_errors(tmp_path: Path) -> None:
    result = asyncio.run(
        load.run_load("none", load.Endpoint(unix=str(tmp_path / "absent.sock")), [b"x"], 2, total=5, warmup=0)
    )
    assert result.requests == 0
    assert result.connection_errors > 0


@pytest.mark.parametrize("kind", ["user", "app"])
def test_inprocess_feeds_keyd_and_the_reference_and_counts_every_answer(kind: str) -> None:
    out = io.StringIO()
    args = cli.build_parser().parse_args(
        ["bench", "--inprocess", "--requests", "600", "--type", kind, "--json"]
    )
    assert args.inprocess
    doc, clean = bench_command.run(cli.bench_options(args), out=out)
    assert clean
    result = json.loads(out.getvalue())["inprocess"]
    assert result == doc["inprocess"]
    rounds = bench_inprocess.ROUNDS
    assert result["answers"] == {"keyd": 600 * rounds, "reference": 600 * rounds}
    assert result["non_200"] == 0
    assert result["keyd_us"] > 0 and result["reference_us"] > 0
    assert result["ratio"] == pytest.approx(result["reference_us"] / result["keyd_us"], rel=0.02)


def test_inprocess_stand_in_transport_counts_refusals() -> None:
    transport = bench_inprocess.StandInTransport(sock=None)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
    assert (transport.answers, transport.non_200) == (2, 1)


def test_ratios_and_targets_are_keyds_throughput_over_each_other_target() -> None:
    def result(name: str, requests: int, p99: float = 1.0, errors: int = 0) -> report.Result:
        return report.Result(name, requests, 1.0, {200: requests}, errors, p99_ms=p99)

    results = {"keyd": result("keyd", 800, p99=2.0), "reference": result("reference", 1000)}
    results["transit"] = result("transit", 100)
    by_target, targets = report.ratios(results)
    assert by_target == {"keyd/reference": 0.8, "keyd/transit": 8.0}
    assert targets["throughput_vs_reference"] == {"target": 0.7, "got": 0.8, "met": True}
    assert targets["throughput_vs_transit"]["met"] and targets["p99_ms"]["met"]
    lines = report.ratio_lines(by_target, targets)
    assert lines[0] == "ratios:    keyd/reference 0.80x   keyd/transit 8.00x"
    assert "MISSED" not in lines[1]
    results["keyd"] = result("keyd", 300, p99=9.0, errors=2)
    _, targets = report.ratios(results)
    assert [name for name, t in targets.items() if not t["met"]] == [
        "throughput_vs_transit",
        "throughput_vs_reference",
        "p99_ms",
        "no_errors",
    ]


def test_pyjwt_run_signs_with_the_key_for_the_time_given() -> None:
    result = compare.pyjwt_run(b"k" * 32, "user", 0.05)
    assert result.requests > 0 and result.statuses == {200: result.requests}
    assert 0.05 <= result.seconds < 1.0
    assert result.note == "in-process, one thread, no I/O"


def test_health_status_is_zero_without_a_keyd(tmp_path: Path) -> None:
    assert stack.health_status(str(tmp_path / "absent.sock")) == 0


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}", 503),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", 200),
        (b"SSH-2.0-OpenSSH_9.6\r\n", 0),
        (b"", 0),
    ],
)
def test_health_status_reads_the_status_line(tmp_path: Path, answer: bytes, status: int) -> None:
    path = str(tmp_path / "k.sock")
    asked: list[bytes] = []
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(1)

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                asked.append(conn.recv(1024))
                conn.sendall(answer)

        thread = threading.Thread(target=serve)
        thread.start()
        assert stack.health_status(path) == status
        thread.join(5)
    assert asked == [b"GET /v1/health HTTP/1.1\r\nHost: keyd\r\nConnection: close\r\n\r\n"]


def test_transit_batches_reads_keyds_batch_histogram_and_refuses_a_keyd_without_one(tmp_path: Path) -> None:
    path = str(tmp_path / "k.sock")
    with_histogram = (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n# HELP keyd_transit_batch_size Inputs per Transit HMAC call\n"
        b'keyd_transit_batch_size_bucket{le="16.0"} 40.0\nkeyd_transit_batch_size_count 52.0\n'
        b"keyd_transit_batch_size_sum 731.0\nkeyd_transit_calls_total 52.0\n"
    )
    without = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nkeyd_tokens_issued_total 3.0\n"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(2)

        def serve() -> None:
            for answer in (with_histogram, without):
                conn, _ = server.accept()
                with conn:
                    assert conn.recv(1024).startswith(b"GET /metrics HTTP/1.1\r\n")
                    conn.sendall(answer)

        thread = threading.Thread(target=serve)
        thread.start()
        assert stack.transit_batches(path) == (52.0, 731.0)
        with pytest.raises(BenchError, match="no keyd_transit_batch_size"):
            stack.transit_batches(path)
        thread.join(5)
