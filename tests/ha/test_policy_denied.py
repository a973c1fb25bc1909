"""A policy that does not allow reading the key's path (issue 11): keyd logs in once, reports the
node and the path, and retries on the normal backoff without logging in again (it used to log in on
every retry: four logins in four seconds).
"""

from __future__ import annotations

import os
import time

from tests.conftest import base_config, new_key
from tests.helpers import KeydProcess, wait_until
from tests.integration.test_core_auth import AppRole


def test_a_read_the_policy_forbids_is_reported_once_without_a_login_storm(bao, root, short_dir, keyd_procs):
    path = "private/" + os.urandom(4).hex()  # outside secret/data/talkjs/*, which the role may read
    root.secrets.kv.v2.create_or_update_secret(path=path, secret={"secret_key": new_key()}, mount_point="secret")
    approle = AppRole(root, short_dir)
    config = base_config(bao, short_dir, path)
    config["vault"]["auth"] = approle.auth
    config["refresh"].update(retry_min="0.2s", retry_max="1s")
    keyd = KeydProcess(short_dir, config, env={})
    keyd_procs.append(keyd)
    keyd.start(wait_ready=False)
    wait_until(lambda: "check keyd's Vault policy" in keyd.logs(), timeout=15, what="the policy error")
    time.sleep(4)  # about eight retries at retry_max 1 s
    logs = keyd.logs()
    assert logs.count("logged in to Vault") == 1, logs
    assert f"does not allow reading secret/data/{path}" in logs
    assert f"at {bao.address}: permission denied (403)" in logs
    assert logs.count("check keyd's Vault policy") == 1, logs  # once per change, repeats at debug
    _, doc = keyd.http().get_json("/v1/health")
    app = doc["apps"]["default"]
    assert app["cause"] == f"permission denied on secret/data/{path}"
    assert app["refresh_failures"] >= 4  # it did keep retrying
