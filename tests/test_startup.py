"""A local `python -m flows.finetune` starts Prefect's temporary API server before the ML imports, and the flow then
uses that server instead of starting a second one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json
from flows.startup import start_temporary_api
from prefect.server.api.server import SubprocessASGIServer

thread = start_temporary_api()
started_early = thread is not None and thread.is_alive()  # the caller goes on while the server boots
thread.join()
early = SubprocessASGIServer()
from prefect.client.orchestration import get_client

with get_client(sync_client=True) as client:
    health = client.api_healthcheck()
    url = str(client.api_url)
print("RESULT " + json.dumps({"started_early": started_early, "early_url": early.api_url, "client_url": url,
                              "healthy": health is None, "servers": len(SubprocessASGIServer._instances)}))
"""


def run(env_extra: dict, tmp_path: Path, code: str = SCRIPT) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=str(ROOT), **env_extra)
    (tmp_path / "prefect").mkdir(exist_ok=True)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert p.returncode == 0 and line, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(line[7:])


def test_the_flow_uses_the_temporary_api_server_started_early(tmp_path):
    r = run({}, tmp_path)
    assert r["started_early"] and r["healthy"]
    assert r["client_url"].rstrip("/") == r["early_url"].rstrip("/")  # the client took the server started early
    assert r["servers"] == 1  # and started no other


def test_no_temporary_server_when_an_api_url_is_configured(tmp_path):
    code = ("import json; from flows.startup import start_temporary_api; "
            "from prefect.server.api.server import SubprocessASGIServer; "
            "print('RESULT ' + json.dumps({'thread': start_temporary_api() is not None, "
            "'servers': len(SubprocessASGIServer._instances)}))")
    r = run({"PREFECT_API_URL": "http://127.0.0.1:9/api"}, tmp_path, code)
    assert r == {"thread": False, "servers": 0}
