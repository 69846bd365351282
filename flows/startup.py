"""Start-up of a local `python -m flows.finetune`: Prefect's temporary API server, started early.

With no PREFECT_API_URL, Prefect starts a temporary API server (a uvicorn subprocess) the first time the flow talks
to its API, and waits until it answers: 5.4 s with an existing Prefect home and 12.6 s with a new one (its database
created) on the 2-core CPU box (BENCHMARKS.md). Before that, the flow's module imports torch, transformers, peft and
bitsandbytes (~7 s there). Started before those imports, by a thread that waits for it to answer, the server boots
while they run.
"""
from __future__ import annotations

import threading


def start_temporary_api() -> threading.Thread | None:
    """Start Prefect's temporary API server in the background when this process will use one (no PREFECT_API_URL).
    Join the returned thread before the flow runs: until it ends the server may not answer yet. None when the run
    talks to a configured API (a server, Prefect Cloud, a worker's run)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    # the instance Prefect's client takes when no API URL is set (prefect.client.orchestration.get_client): one per
    # process, so the flow finds it started and does not start another
    server = SubprocessASGIServer()
    thread = threading.Thread(target=server.start, name="prefect-temporary-api", daemon=True)
    thread.start()
    return thread
