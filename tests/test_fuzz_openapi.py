"""Fuzzing over the served OpenAPI document (issue #16, deliverable 3): schemathesis against a
real `coordinator serve` process with reference Islands attached, every operation (consumer
with an API key, operator with the admin token, Island registration), positive and negative
data, a fixed example budget per operation and mode and a fixed seed (derandomized) so CI stays
bounded. Checks: no 5xx, every documented response valid against its schema, the declared
content type. Then a stateful pass over real resources (a created Job, API key, Island,
account) for the operations whose path parameters the schema cannot link.

The number of generated cases is printed (`fuzz_cases=N`) and asserted to be non-trivial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.api_harness import ServerProcess, make_backend
from tests.fault_harness import ROOT, cli_json

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)

ADMIN_TOKEN = "fuzz-operator-token-0123456789"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))  # per operation and mode
SEED = 16
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
CHAT_MODELS = "mistral-7b-instruct,llama-3.1-8b-instruct,tinyllama-1.1b-chat,qwen2.5-0.5b-instruct"


@pytest.fixture(scope="module", params=["embedded", pytest.param("pg_redis", marks=[pytest.mark.postgres,
                                                                                        pytest.mark.redis])])
def world(request, tmp_path_factory):
    backend = make_backend(request.param, tmp_path_factory.mktemp(f"fuzz-{request.param}"))
    env = backend.env(COORDINATOR_PROJECTIONS="process", COORDINATOR_ADMIN_TOKEN=ADMIN_TOKEN,
                      COORDINATOR_RATE_LIMIT_PER_MIN="1000000", COORDINATOR_CHAT_WAIT_S="20",
                      COORDINATOR_QUEUE_TIMEOUT_S="5")
    acct = cli_json(env, "accounts", "create", "--email", "fuzz@example.com", "--credits", "1000000", "--kyc")
    server = ServerProcess(env)
    agents = []
    for name, backend_kind, extra in (("fuzz-chat", "echo", ["--cargos", "llm-chat,llm-chat-lite", "--models",
                                                               CHAT_MODELS, "--vram-mb", "24000", "--ram-mb",
                                                               "64000", "--tokens-per-s", "2000",
                                                               "--reply-tokens", "4", "--slots", "16"]),
                                      ("fuzz-image", "image", ["--steps-per-s", "5000", "--slots", "8"])):
        isl = cli_json(env, "islands", "create", "--owner", acct["account_id"], "--name", name, "--approve")
        agents.append(subprocess.Popen([sys.executable, "-m", "coordinator.cli", "island", "run", "--server",
                                        server.url, "--token", isl["token"], "--backend", backend_kind, *extra],
                                       env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    yield {"server": server, "key": acct["api_key"], "account_id": acct["account_id"], "env": env}
    for a in agents:
        a.send_signal(signal.SIGINT)
    for a in agents:
        try:
            a.wait(15)
        except subprocess.TimeoutExpired:
            a.kill()
    server.signal(signal.SIGTERM)
    try:
        assert server.wait(40) == 0
    finally:
        server.kill()
        backend.cleanup()


def _auth(path: str, world: dict) -> dict[str, str]:
    if path.startswith("/api/v1/admin"):
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    return {"Authorization": f"Bearer {world['key']}"}


def _operations(schema):
    ops = []
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path.endswith("/stream"):  # an SSE stream of a real Job stays open by design: stateful pass
            continue
        ops.append(op)
    return ops


@pytest.mark.slow
def test_every_operation_positive_and_negative_no_5xx_and_schema_valid(world):
    url = world["server"].url
    schema = schemathesis.openapi.from_url(url + "/api/v1/schema/openapi.json")
    ops = _operations(schema)
    assert len(ops) >= 35, [o.label for o in ops]
    counts = {"cases": 0, "operations": len(ops)}
    failures: list[str] = []
    statuses: dict[int, int] = {}
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            headers = _auth(op.path, world)
            strategy = op.as_strategy(generation_mode=mode)

            @seed(SEED)
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=["explicit", "generate"])
            @given(case=strategy)
            def run(case):
                counts["cases"] += 1
                case.headers = {**(case.headers or {}), **headers}
                response = case.call(base_url=url, timeout=30)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                try:
                    case.validate_response(response, checks=CHECKS)
                except Exception as exc:  # noqa: BLE001 - collected, reported together
                    if len(failures) < 50:
                        failures.append(f"{op.label} [{mode.value}] -> {response.status_code}: "
                                        f"{str(exc)[:600]}")

            try:
                run()
            except Exception as exc:  # noqa: BLE001 - an unsatisfiable strategy is reported, not fatal
                if "Unsatisfiable" not in type(exc).__name__:
                    failures.append(f"{op.label} [{mode.value}]: {type(exc).__name__}: {str(exc)[:400]}")
    print(f"fuzz_cases={counts['cases']} operations={counts['operations']} statuses={json.dumps(statuses)}")
    assert counts["cases"] >= len(ops) * 4
    assert not any(s >= 500 for s in statuses), statuses
    assert not failures, "\n".join(failures)


def _real_ids(world: dict) -> dict[str, str]:
    """Real resources to bind path parameters to (what links would carry): a finished Job, a
    batch, an API key, an Island of the account, the account itself, a workload and a model."""
    from tests.api_harness import read_sse

    server = world["server"]
    with server.client(world["key"]) as cl:
        job = cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "fuzz"}}).json()["data"]
        read_sse(cl, f"/jobs/{job['id']}/stream", timeout_s=30)  # runs to the end on the echo Island
        batch = cl.post("/jobs/batch", json={"workload": "llm-chat", "inputs": [{"prompt": "a"}, {"prompt": "b"}]})
        key = cl.post("/api-keys", json={"name": "fuzz-extra"}).json()["data"]
        island = cl.post("/islands", json={"name": "fuzz-reg", "capabilities": {"cargos": ["llm-chat"]}})
    assert batch.status_code == 201 and island.status_code == 201, (batch.text, island.text)
    isl_id = island.json()["data"]["id"]
    return {"job_id": job["id"], "batch_id": batch.json()["id"], "key_id": key["id"], "island_id": isl_id,
            "account_id": world["account_id"], "slug": "llm-chat", "model_id": "llm-chat"}


@pytest.mark.slow
def test_operations_on_real_resources_no_5xx_and_schema_valid(world):
    url = world["server"].url
    ids = _real_ids(world)
    schema = schemathesis.openapi.from_url(url + "/api/v1/schema/openapi.json")
    counts = {"cases": 0}
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        names = [p.name for p in op.path_parameters]
        if not names:
            continue
        for which in (["job_id"], ["batch_id"]) if "job_id" in names else ([None],):
            bound = {}
            for n in names:
                key = which[0] if n == "job_id" else n
                if key in ids:
                    bound[n] = ids[key]
            if len(bound) != len(names):
                continue
            headers = _auth(op.path, world)

            @seed(SEED)
            @settings(max_examples=max(3, EXAMPLES // 3), deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=["explicit", "generate"])
            @given(case=op.as_strategy(path_parameters=bound))
            def run(case):
                counts["cases"] += 1
                case.headers = {**(case.headers or {}), **headers}
                response = case.call(base_url=url, timeout=30)
                try:
                    case.validate_response(response, checks=CHECKS)
                except Exception as exc:  # noqa: BLE001
                    failures.append(f"{op.label} {bound} -> {response.status_code}: {str(exc)[:600]}")

            run()
    print(f"fuzz_stateful_cases={counts['cases']}")
    assert counts["cases"] >= 20
    assert not failures, "\n".join(failures[:30])
