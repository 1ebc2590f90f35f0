"""enginesmith serve --ray: the protocol's front ends with the engines in Ray Serve replicas, on a
two-node local Ray cluster started here (a head and a second node, each its own raylet process)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray", reason="serve --ray needs the 'ray' extra")
pytest.importorskip("ray.serve", reason="serve --ray needs ray[serve]")
pytest.importorskip("aiohttp", reason="serving needs the 'serve' extra")
httpclient = pytest.importorskip("tritonclient.http", reason="the serving tests use tritonclient[http]")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="the serving tests use tritonclient")

from tritonclient.utils import InferenceServerException  # noqa: E402

import enginesmith as es  # noqa: E402
from enginesmith.cli.app import main  # noqa: E402
from enginesmith.serve.protocol import ProtocolError  # noqa: E402
from enginesmith.serve.ray_backend import RayOptions  # noqa: E402
from serve_models import build_engine, get, json_request, make_gather, make_slow, metric, mlp_model, post  # noqa: E402

PORTS = dict(http_port=0, grpc_port=0, metrics_port=0)
SLOW_WIDTH = 256
SLOW_LAYERS = 40  # a 4,000-row request keeps a replica busy for a few hundred ms


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray_engines")
    return {"mlp": build_engine(mlp_model(), folder, "mlp"),
            "slow": build_engine(make_slow(width=SLOW_WIDTH, layers=SLOW_LAYERS), folder, "slow"),
            "gather": build_engine(make_gather(), folder, "gather")}


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, one CPU each, torn down after the module."""
    from ray.cluster_utils import Cluster

    # Port 0 for each node's agent: by default both agents (and any agent a stale session left behind) ask for
    # the same fixed HTTP port 52365 on this one host.
    node = dict(num_cpus=1, dashboard_agent_listen_port=0)
    failures: list[str] = []
    # A short folder of our own, not pytest's: Ray's socket paths inside it must stay under 108 bytes, and
    # pytest-xdist's per-worker folders (/tmp/pytest-of-USER/pytest-N/popen-gw0/ray0/session_.../sockets/...)
    # make them longer.
    root = tempfile.mkdtemp(prefix="es-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    for attempt in range(3):  # Ray waits a fixed 30 s for a raylet to register: a busy CI host can miss it once
        temp_dir = tempfile.mkdtemp(prefix=f"{attempt}-", dir=root)
        local = Cluster(initialize_head=False)
        try:
            local.add_node(**node, include_dashboard=False, temp_dir=temp_dir)  # the first node added is the head
            local.add_node(**node)
            break
        except Exception as error:  # noqa: BLE001 - Ray raises plain Exception here
            failures.append(f"attempt {attempt + 1}: {error}\n{_ray_log_tails(temp_dir)}")
            _stop_half_started(local, temp_dir)
    else:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail("a local Ray cluster did not start:\n" + "\n".join(failures))
    yield local
    if ray.is_initialized():
        ray.shutdown()
    local.shutdown()
    shutil.rmtree(root, ignore_errors=True)


def _ray_log_tails(temp_dir: str, lines: int = 15) -> str:
    """The last lines of the raylet's and GCS's logs: why a start failed, in the test report."""
    logs = sorted(Path(temp_dir).glob("session_*/logs/*")) if temp_dir else []
    picked = [log for log in logs if log.name.startswith(("raylet", "gcs_server", "dashboard_agent"))]
    return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                     for log in picked if log.is_file() and log.stat().st_size)


def _stop_half_started(local, temp_dir: str) -> None:
    """A node that timed out is not in the Cluster's books: its processes are found by the session folder."""
    import psutil

    try:
        local.shutdown()
    except Exception:  # noqa: BLE001 - best effort: the next attempt starts afresh
        pass
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or ()):
            try:
                process.kill()
            except psutil.Error:
                pass


@pytest.fixture(scope="module")
def server(engines, cluster):
    """Two replicas of each engine, reached through --address (a quarter CPU each: 6 replicas on 2 CPUs)."""
    options = RayOptions(address=cluster.address, replicas=2, cpus_per_replica=0.25, request_timeout_s=30)
    lines: list[str] = []
    with es.serve([engines["mlp"], engines["slow"], engines["gather"]], ray=options, log=lines.append,
                  max_queue_delay_us=2000, **PORTS) as handle:
        handle.log_lines = lines
        yield handle


@pytest.fixture(scope="module")
def reference(engines):
    loaded = {name: es.load(path) for name, path in engines.items()}
    yield loaded
    for engine in loaded.values():
        engine.close()


def _host(url: str) -> str:
    return url.removeprefix("http://")


def _rows(rows: int, seed: int, width: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def test_an_address_where_no_cluster_answers_is_one_line_at_once(engines, capsys):
    """First in the file: this process is not connected to Ray yet (ray.init would wait for minutes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    started = time.perf_counter()
    assert main(["serve", str(engines["mlp"]), "--ray", "--address", f"127.0.0.1:{port}", "--duration", "1"]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - started < 15 and not ray.is_initialized()
    assert f"cannot connect to Ray at '127.0.0.1:{port}': nothing answers there" in err
    assert len(err.strip().splitlines()) == 1


def test_replicas_run_on_the_cluster(server, cluster):
    assert any(f"mlp: 2 replica(s) on Ray at {cluster.address}" in line for line in server.log_lines)
    from ray import serve

    apps = {name: app for name, app in serve.status().applications.items() if name.startswith("enginesmith-")}
    running = {name: sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())
               for name, app in apps.items()}
    assert sorted(running.values()) == [2, 2, 2], running
    # each replica loaded the engine from the bytes it was sent: two processes per model
    handle = serve.get_app_handle(next(name for name in apps if name.startswith("enginesmith-mlp-")))
    pids = {handle.describe.remote().result(timeout_s=30)["pid"] for _ in range(20)}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    # no access log line per call in the replicas' logs: it cost them CPU on every request
    logs = list((Path(cluster.head_node.get_session_dir_path()) / "logs" / "serve").glob("replica_enginesmith-mlp-*.log"))
    assert logs and not any("CALL describe" in log.read_text(errors="replace") for log in logs)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_answers_equal_the_in_process_engine(server, reference, binary):
    client = httpclient.InferenceServerClient(_host(server.url))
    x = _rows(5, 1)
    given = httpclient.InferInput("x", list(x.shape), "FP32")
    given.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("mlp", [given], outputs=[httpclient.InferRequestedOutput("probs", binary_data=binary)],
                          request_id="r-1")
    np.testing.assert_array_equal(result.as_numpy("probs"), reference["mlp"](x=x)["probs"])
    assert result.get_response()["id"] == "r-1"


def test_grpc_answers_equal_the_in_process_engine(server, reference):
    client = grpcclient.InferenceServerClient(server.grpc_address)
    assert client.is_model_ready("slow") and client.get_model_metadata("mlp", as_json=True)["platform"] == "enginesmith_onnxruntime"
    x = _rows(3, 2, SLOW_WIDTH)
    given = grpcclient.InferInput("x", list(x.shape), "FP32")
    given.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("slow", [given]).as_numpy("y"), reference["slow"](x=x)["y"])


def test_concurrent_requests_are_batched_in_the_replicas(server, reference):
    before = server.models["mlp"].stats.snapshot()

    def one(seed: int) -> np.ndarray:
        client = httpclient.InferenceServerClient(_host(server.url))
        given = httpclient.InferInput("x", [2, 6], "FP32")
        given.set_data_from_numpy(_rows(2, seed))
        return client.infer("mlp", [given]).as_numpy("probs")

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(64)))
    for seed, got in enumerate(answers):
        np.testing.assert_allclose(got, reference["mlp"](x=_rows(2, seed))["probs"], rtol=1e-6, atol=1e-7)
    after = server.models["mlp"].stats.snapshot()
    page = get(server.metrics_url.removesuffix("/metrics"), "/metrics")[1].decode()
    assert metric(page, "nv_inference_count", "mlp") == after.inference_count
    assert after.inference_count - before.inference_count == 128  # items counted by the replicas' engine calls
    assert after.request_success - before.request_success == 64
    assert 0 < after.exec_count - before.exec_count <= 64


def test_bad_requests_are_answered_by_the_front_end(server):
    x = _rows(2, 3).astype(np.float64)
    status, _, body = post(server.url, "/v2/models/mlp/infer", json_request({"x": x}, "FP64"))
    assert status == 400 and "input 'x' is FP64, but model 'mlp' takes FP32" in json.loads(body)["error"]
    status, _, body = post(server.url, "/v2/models/nope/infer", json_request({"x": x}))
    assert status == 404
    client = grpcclient.InferenceServerClient(server.grpc_address)
    given = grpcclient.InferInput("x", [2, 5], "FP32")
    given.set_data_from_numpy(_rows(2, 3, 5))
    with pytest.raises(InferenceServerException, match="StatusCode.INVALID_ARGUMENT"):
        client.infer("mlp", [given])


def test_an_engine_error_in_a_replica_fails_only_its_request(server):
    """GatherElements with an index out of range raises in ONNX Runtime inside the replica: 500, and the
    requests batched with it are still answered."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    good = json.dumps({"inputs": [
        {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()},
        {"name": "idx", "shape": [2, 1], "datatype": "INT64", "data": [1, 3]}]}).encode()
    bad = good.replace(b"[1, 3]", b"[1, 9]")
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda body: post(server.url, "/v2/models/gather/infer", body), [good, bad] * 3))
    for (status, _, body), sent in zip(answers, [good, bad] * 3):
        if sent is good:
            assert status == 200 and json.loads(body)["outputs"][0]["data"] == [1.0, 7.0]
        else:
            assert status == 500 and "model 'gather' failed on this request" in json.loads(body)["error"]


def _replica_actors(app_prefix: str) -> list[tuple[str, str]]:
    return [(actor["name"], actor["namespace"]) for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith("SERVE_REPLICA::") and app_prefix in actor["name"]]


def _busy_replica(replicas: list[tuple[str, str]], deadline: float):
    """A replica with requests in progress: the one whose count is highest, or that is too busy to answer."""
    actors = [ray.get_actor(name, namespace=namespace) for name, namespace in replicas]
    while time.monotonic() < deadline:
        calls = [actor.get_num_ongoing_requests.remote() for actor in actors]
        ray.wait(calls, num_returns=len(calls), timeout=0.1)
        counts = [ray.get(call) if ray.wait([call], timeout=0)[0] else float("inf") for call in calls]
        if max(counts) > 0:
            return actors[counts.index(max(counts))]
        time.sleep(0.01)
    raise AssertionError("no replica had a request in progress")


def test_a_replica_killed_mid_load_loses_no_request(server, reference):
    """Many requests in flight, one replica killed: every request gets exactly one answer, the right
    output or an error status, within its client's timeout."""
    requests, large = 160, 4
    # the last ``large`` requests hold 4,000 rows each (a few hundred ms of work): sent just before the kill,
    # so the replica killed surely has work in flight, however fast it is at the one-row requests
    inputs = [_rows(1 if seed < requests - large else 4000, seed, SLOW_WIDTH) for seed in range(requests)]
    answers: dict[int, list] = {i: [] for i in range(requests)}
    started = threading.Event()
    large_sent = threading.Semaphore(0)
    dispatcher = server.models["slow"].batcher
    retried_before = dispatcher.retried

    def one(index: int) -> None:
        started.set()
        client = httpclient.InferenceServerClient(_host(server.url), network_timeout=60, connection_timeout=60)
        given = httpclient.InferInput("x", list(inputs[index].shape), "FP32")
        given.set_data_from_numpy(inputs[index])
        if len(inputs[index]) > 1:
            large_sent.release()
        try:
            answers[index].append(("ok", client.infer("slow", [given]).as_numpy("y")))
        except InferenceServerException as exc:
            answers[index].append(("error", str(exc)))

    app = next(name for name in ray.serve.status().applications if name.startswith("enginesmith-slow-"))
    replicas = _replica_actors(app)
    assert len(replicas) == 2
    with ThreadPoolExecutor(24) as pool, ThreadPoolExecutor(large) as large_pool:
        futures = [pool.submit(one, i) for i in range(requests - large)]
        started.wait(10)
        # Kill once answers flow and while most requests are still to come, with the large requests spread
        # over both replicas (each is routed to the less loaded one) and still running.
        deadline = time.monotonic() + 60
        while sum(len(got) for got in answers.values()) < 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        futures += [large_pool.submit(one, i) for i in range(requests - large, requests)]
        for _ in range(large):
            large_sent.acquire(timeout=30)
        victim = _busy_replica(replicas, deadline)  # the kill meets requests in progress
        ray.kill(victim, no_restart=True)
        for future in futures:
            future.result(timeout=90)  # none hangs
    assert all(len(got) == 1 for got in answers.values())  # exactly one answer each
    errors = [got[0][1] for got in answers.values() if got[0][0] == "error"]
    for index, ((kind, value),) in answers.items():
        if kind == "ok":  # merged into batches of other sizes than 1: the GEMM may sum in another order
            np.testing.assert_allclose(value, reference["slow"](x=inputs[index])["y"], rtol=1e-5, atol=1e-5)
    # a failed request says why (503, the replica failed); none is a bare 500 from a lost connection
    assert all("replica failed" in text or "did not answer" in text for text in errors), errors[:3]
    # (whether the requests the victim held come back here as failures to retry depends on Ray Serve: its
    # router resends some itself, so no count of retries is asserted)
    if dispatcher.retried > retried_before:  # said once, not once per request
        assert len([line for line in server.log_lines if line.startswith("slow: a replica failed")]) == 1
    # Ray Serve starts a replacement; the model keeps answering
    client = httpclient.InferenceServerClient(_host(server.url))
    given = httpclient.InferInput("x", [1, SLOW_WIDTH], "FP32")
    given.set_data_from_numpy(inputs[0])
    np.testing.assert_array_equal(client.infer("slow", [given]).as_numpy("y"), reference["slow"](x=inputs[0])["y"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_on_the_cluster_at_address(engines, cluster, server, reference, capsys):
    http_port = _free_port()
    exit_codes: list[int] = []
    thread = threading.Thread(target=lambda: exit_codes.append(main([
        "serve", str(engines["mlp"]), "--name", "cli", "--ray", "--address", cluster.address, "--replicas", "1",
        "--replica-cpus", "0.25", "--http-port", str(http_port), "--grpc-port", "0", "--metrics-port", "0",
        "--duration", "3"])))
    thread.start()
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and thread.is_alive():
        try:
            if client.is_model_ready("cli"):
                break
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.2)
    x = _rows(2, 5)
    given = httpclient.InferInput("x", [2, 6], "FP32")
    given.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("cli", [given]).as_numpy("probs"), reference["mlp"](x=x)["probs"])
    thread.join(60)
    assert exit_codes == [0]
    out = capsys.readouterr().out
    assert f"on Ray at {cluster.address}" in out and "stopped" in out
    # its application is deleted; the module's server (same process, same cluster) still serves
    assert not [name for name in ray.serve.status().applications if name.startswith("enginesmith-cli-")]
    status, _, _ = post(server.url, "/v2/models/mlp/infer", json_request({"x": x}))
    assert status == 200


def test_cli_ray_errors_are_one_line(engines, capsys, monkeypatch):
    assert main(["serve", str(engines["mlp"]), "--replicas", "2", "--duration", "1"]) == 2
    assert "--replicas is for serving on Ray: add --ray" in capsys.readouterr().err
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["serve", str(engines["mlp"]), "--ray", "--duration", "1"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'enginesmith[ray]'" in err and len(err.strip().splitlines()) == 1


def test_more_gpus_than_the_cluster_has_is_refused(engines, cluster, server):
    options = RayOptions(address=cluster.address, replicas=2, gpus_per_replica=1)
    with pytest.raises(es.ServeError, match="asks for 1 GPU per replica x 2 replicas, but the Ray cluster has 0 GPUs"):
        es.serve([engines["mlp"]], ray=options, **PORTS)


def test_a_replica_that_cannot_load_its_engine_stops_the_start(engines, cluster, server, tmp_path):
    """The payload is damaged: the front end reads only the manifest, the replica's checksum check fails,
    and the start fails with the replica's reason, not Ray's traceback; nothing is left on the cluster."""
    import zipfile

    damaged = tmp_path / "damaged.engine"
    with zipfile.ZipFile(engines["mlp"]) as zin, zipfile.ZipFile(damaged, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info.filename, data[::-1] if info.filename.startswith("payload/") else data)
    options = RayOptions(address=cluster.address, replicas=1, cpus_per_replica=0.25)
    with pytest.raises(es.ServeError) as info:
        es.serve([damaged], ray=options, **PORTS)
    message = str(info.value)
    assert message.startswith("model 'damaged' could not start on Ray: ") and "checksum" in message.lower()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert not [name for name in ray.serve.status().applications if name.startswith("enginesmith-damaged-")]


def test_a_replica_rebuilds_a_bundle_for_another_platform(monkeypatch, engines, tmp_path):
    """What a replica does on a node unlike the build machine: rebuild from the embedded source, or say why not."""
    import shutil

    import enginesmith.backends.onnxruntime as ort_backend
    from enginesmith.serve.ray_backend import load_or_rebuild

    path = shutil.copy(engines["mlp"], tmp_path / "mlp.engine")
    real = ort_backend.host_fingerprint
    monkeypatch.setattr(ort_backend, "host_fingerprint", lambda: {**real(), "arch": "aarch64"})
    said: list[str] = []
    engine = load_or_rebuild(tmp_path / "mlp.engine", trust_code=False, rebuild=True, log=said.append)
    assert engine.manifest.fingerprint["arch"] == "aarch64" and "rebuilding it here" in said[0]
    x = _rows(3, 9)
    np.testing.assert_allclose(engine(x=x)["probs"], es.load(engines["mlp"], check_platform=False)(x=x)["probs"],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(es.PlatformMismatchError, match="arch is aarch64"):
        load_or_rebuild(path, trust_code=False, rebuild=False, log=said.append)


# ---------------------------------------------------------------- the dispatcher's deadline and retries, alone


class _FakeHandle:
    """Stands in for a DeploymentHandle: each call's answer comes from ``script`` (an exception to raise,
    "hang" to never answer, or outputs)."""

    def __init__(self, script: list):
        self.script = list(script)
        self.responses: list = []

    def options(self, **kwargs):
        return self

    def remote(self, group, timeout_s):
        response = _FakeResponse(self.script.pop(0) if self.script else "hang", group)
        self.responses.append(response)
        return response


class _FakeResponse:
    def __init__(self, step, group):
        self.step, self.group, self.cancelled = step, group, False

    async def _answer(self):
        from enginesmith.serve.metrics import ModelCounters
        from enginesmith.serve.ray_backend import ReplicaAnswer

        if self.step == "hang":
            await asyncio.sleep(3600)
        if isinstance(self.step, BaseException):
            raise self.step
        if self.step in ("slow", "slow, bad second"):
            await asyncio.sleep(0.2)
        counters = ModelCounters(exec_count=1, inference_count=sum(len(feeds["x"]) for feeds in self.group))
        if self.step == "slow, bad second":  # the replica refused the group's second request alone
            return [ReplicaAnswer(replica="r1", counters=counters, status=400, message="bad input") if i == 1 else
                    ReplicaAnswer(replica="r1", counters=counters, outputs={"y": feeds["x"] * 2})
                    for i, feeds in enumerate(self.group)]
        counters = ModelCounters(exec_count=1, inference_count=sum(len(feeds["x"]) for feeds in self.group))
        return [ReplicaAnswer(replica="r1", counters=counters, outputs={"y": feeds["x"] * 2}) for feeds in self.group]

    def __await__(self):
        return self._answer().__await__()

    def cancel(self):
        self.cancelled = True


def _dispatcher(script: list, **options):
    from enginesmith.serve.batcher import BatchingOptions
    from enginesmith.serve.ray_backend import ReplicaDispatcher

    handle = _FakeHandle(script)
    return ReplicaDispatcher("m", handle, BatchingOptions(), RayOptions(**options), "app"), handle


def test_a_request_whose_replica_dies_is_sent_again():
    from ray.exceptions import ActorDiedError

    lines: list[str] = []
    dispatcher, handle = _dispatcher([ActorDiedError(), ActorDiedError(), "ok"], retries=2)
    dispatcher._log = lines.append
    x = np.ones((2, 3), np.float32)
    outputs = asyncio.run(dispatcher.run({"x": x}, None))
    np.testing.assert_array_equal(outputs["y"], x * 2)
    assert dispatcher.retried == 2 and len(handle.responses) == 3 and len(lines) == 1
    assert dispatcher.stats.snapshot().exec_count == 1 and dispatcher.pending == 0


def test_a_request_is_answered_503_when_every_attempt_fails():
    from ray.exceptions import ActorDiedError

    dispatcher, handle = _dispatcher([ActorDiedError()] * 3, retries=2)
    with pytest.raises(ProtocolError) as info:
        asyncio.run(dispatcher.run({"x": np.ones((1, 3), np.float32)}, None))
    assert info.value.status == 503 and info.value.retry_after_s == 1
    assert "its replica failed" in str(info.value) and "3 times" in str(info.value) and len(handle.responses) == 3


def test_no_request_waits_past_its_deadline():
    dispatcher, handle = _dispatcher(["hang"], request_timeout_s=30)
    started = time.perf_counter()
    with pytest.raises(ProtocolError) as info:
        asyncio.run(dispatcher.run({"x": np.ones((1, 3), np.float32)}, 0.3))
    assert 0.25 < time.perf_counter() - started < 5
    assert info.value.status == 503 and "did not answer within 0.3 s" in str(info.value)
    assert handle.responses[0].cancelled and dispatcher.pending == 0


def test_requests_that_find_every_call_busy_leave_together_and_fail_alone():
    """Two calls in flight per replica; the requests behind them go in one call, each answered on its own."""
    dispatcher, handle = _dispatcher(["slow", "slow", "slow, bad second"], replicas=1)
    inputs = [np.full((1 + i % 2, 3), i, np.float32) for i in range(6)]

    async def six_at_once():
        return await asyncio.gather(*(dispatcher.run({"x": x}, None) for x in inputs), return_exceptions=True)

    answers = asyncio.run(six_at_once())
    assert [len(r.group) for r in handle.responses] == [1, 1, 4] and dispatcher.calls == 3
    assert [g[0]["x"][0, 0] for g in (r.group for r in handle.responses)] == [0, 1, 2]  # in arrival order
    for i, (x, answer) in enumerate(zip(inputs, answers)):
        if i == 3:  # the second of the third call's group
            assert isinstance(answer, ProtocolError) and answer.status == 400 and "bad input" in str(answer)
        else:
            np.testing.assert_array_equal(answer["y"], x * 2)
    assert dispatcher.pending == 0 and dispatcher.stats.snapshot().inference_count == 6  # 1 + 2 + 1 + 2 items


def test_a_group_holds_at_most_max_batch_items():
    from enginesmith.serve.batcher import BatchingOptions
    from enginesmith.serve.ray_backend import ReplicaDispatcher

    handle = _FakeHandle(["slow", "slow", "slow", "slow", "ok"])
    dispatcher = ReplicaDispatcher("m", handle, BatchingOptions(max_batch=4), RayOptions(replicas=1), "app")

    async def seven_at_once():
        return await asyncio.gather(*(dispatcher.run({"x": np.ones((2, 3), np.float32)}, None) for _ in range(7)))

    asyncio.run(seven_at_once())
    assert [len(r.group) for r in handle.responses] == [1, 1, 2, 2, 1]  # 2 + 2 items, then what is left
