"""The GPU work pool templates validate through the CLI users run: `prefect work-pool create --base-job-template`
against a real local `prefect server` (tests/test_deployment.py posts them through the API within its stack test;
this one is the documented command, alone and fast). Also: the worker image's Dockerfile matches the templates."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deployments"
POOLS = {"docker-gpu": ("docker", "docker-gpu.base-job-template.json"),
         "k8s-gpu": ("kubernetes", "k8s-gpu.base-job-template.json")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_SERVER_UI_ENABLED="false")
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("prefect server did not start:\n" + (home / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    yield env
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def prefect(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], env=env, capture_output=True,
                          text=True, timeout=180)


def test_gpu_templates_create_work_pools_through_the_cli(server):
    for name, (kind, template) in POOLS.items():
        out = prefect(server, "work-pool", "create", f"test-{name}", "--type", kind,
                      "--base-job-template", str(DEPLOY / template))
        assert out.returncode == 0, out.stdout + out.stderr
        shown = prefect(server, "work-pool", "inspect", f"test-{name}")
        assert shown.returncode == 0 and f"test-{name}" in shown.stdout, shown.stdout + shown.stderr
    k8s = prefect(server, "work-pool", "inspect", "test-k8s-gpu", "--output", "json")
    if k8s.returncode == 0 and k8s.stdout.lstrip().startswith("{"):
        tpl = json.loads(k8s.stdout)["base_job_template"]
        container = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
        assert {"image", "gpu_count", "node_selector"} <= set(tpl["variables"]["properties"])


def test_a_broken_template_is_rejected(server, tmp_path):
    bad = json.loads((DEPLOY / "k8s-gpu.base-job-template.json").read_text())
    bad["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["image"] = "{{ no_such_variable }}"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    out = prefect(server, "work-pool", "create", "test-bad", "--type", "kubernetes", "--base-job-template", str(path))
    assert out.returncode != 0 and "no_such_variable" in out.stdout + out.stderr, out.stdout + out.stderr


def test_dockerfile_matches_the_templates():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "WORKDIR /opt/personatune" in text  # the pull step's directory (prefect-gpu.yaml)
    docker = json.loads((DEPLOY / "docker-gpu.base-job-template.json").read_text())
    assert docker["variables"]["properties"]["image"]["default"] == "personatune:gpu"
    assert "-t personatune:gpu" in text
    for var in ("NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"):
        assert var in text
    for copied in ("personatune", "flows", "tasks", "data", "configs", "prefect.yaml"):
        assert (ROOT / copied).exists(), copied


def test_dockerfile_pins_a_stack_within_the_package_bounds():
    """The image pins the GPU stack that was run; pyproject's lower bounds must admit it (else the bounds claim a
    version the image does not have, or the image installs what pyproject forbids)."""
    import re
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    text = (DEPLOY / "Dockerfile").read_text()
    pins = {Requirement(p).name.lower().replace("_", "-"): Version(p.split("==")[1])
            for p in re.findall(r'"([A-Za-z0-9_.-]+==[0-9][^"]*)"', text)}
    assert {"torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "huggingface-hub"} <= set(pins)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {r.name.lower().replace("_", "-"): r.specifier for r in map(Requirement, project["dependencies"])}
    outside = {name: f"{version} vs {bounds[name]}" for name, version in pins.items()
               if name in bounds and not bounds[name].contains(version)}
    assert outside == {}, f"Dockerfile pins outside pyproject.toml's bounds: {outside}"
    python = re.search(r"^FROM python:(\d+\.\d+)", text, re.M)
    assert python and Version(python.group(1)) in Requirement(f"python{project['requires-python']}").specifier
