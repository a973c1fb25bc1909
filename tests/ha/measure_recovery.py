"""Measure how soon keyd signs again after a whole Vault cluster comes back (docs/deploy.md, "Vault HA").

    .venv/bin/python -m tests.ha.measure_recovery [--outages 3,15,40] [--probe-interval 0.5s]
                                                  [--retry-max 5s] [--rounds 1]

Starts a 3-node OpenBao Raft cluster with TLS (tests/ha/raft_cluster.py) and keyd on it under token
load (AppRole), then, for each outage length, crashes every node, waits, starts and unseals them, and
prints the seconds between the first moment the cluster can serve keyd again and keyd's first 200
after the restart. "Can serve keyd" is polled by this script every 20 ms: a read with a valid token
when keyd's token outlived the outage; an AppRole login with keyd's credentials plus a read when it
ran out and keyd had to log in again (OpenBao standbys serve reads before a new active node is
elected, but a login needs the active node). Run it once with a huge --probe-interval
(e.g. 1h) to see what the recovery would be without keyd's sys/health probes (the refresh backoff
alone, up to --retry-max).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from keyd.config import parse_duration
from tests.conftest import new_key
from tests.ha.raft_cluster import RaftCluster
from tests.ha.scenario import PATH, full_outage_and_recovery, keyd_config
from tests.helpers import KeydProcess
from tests.resilience.support import Load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outages", default="3,15,40", help="outage lengths in seconds, comma-separated")
    parser.add_argument("--probe-interval", default="0.5s", help="keyd's vault.probe_interval")
    parser.add_argument("--retry-max", default="5s", help="keyd's refresh.retry_max")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every outage this many times")
    args = parser.parse_args()
    outages = [float(x) for x in args.outages.split(",")]
    cluster = RaftCluster()
    directory = Path(tempfile.mkdtemp(prefix="kd-m-", dir="/tmp"))
    proc: KeydProcess | None = None
    try:
        print("starting a 3-node OpenBao Raft cluster (TLS) ...", flush=True)
        cluster.start()
        cluster.write_key(PATH, new_key())
        approle = cluster.approle(directory, token_ttl="15s")
        config = keyd_config(cluster, directory, approle)
        config["vault"]["probe_interval"] = args.probe_interval
        config["refresh"]["retry_max"] = args.retry_max
        proc = KeydProcess(directory, config, env={})
        proc.start()
        print(
            f"keyd: probe_interval {args.probe_interval}, retry_max {args.retry_max}, "
            f"max_stale {config['refresh']['max_stale']}",
            flush=True,
        )
        results: list[float] = []
        with Load(proc.socket, connections=2) as load:
            load.wait_for(20)
            for _ in range(args.rounds):
                for outage in outages:
                    recovery = full_outage_and_recovery(cluster, proc, load, outage, approle)
                    results.append(recovery.seconds)
                    need = "a login and a read" if recovery.logged_in else "a read"
                    print(
                        f"outage {outage:5.1f} s: keyd signed again {recovery.seconds:.2f} s after the "
                        f"cluster could serve {need} (read possible {recovery.read_ready - recovery.ready:+.2f} s, "
                        f"login {recovery.login_ready - recovery.ready:+.2f} s from then)",
                        flush=True,
                    )
                    time.sleep(2)
        print(
            f"recovery over {len(results)} outage(s): median {statistics.median(results):.2f} s, "
            f"max {max(results):.2f} s (target 2 s; retry_max alone would allow up to "
            f"{parse_duration(args.retry_max):.1f} s)"
        )
    finally:
        if proc is not None:
            proc.stop()
        cluster.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
