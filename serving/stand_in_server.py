"""A STAND-IN for TF Serving's model server, for tests, benchmarks and local trials only.

`tensorflow_model_server` is not installable from the package registries (docs/serving.md), so
this module serves the exports as the model server does, as closely as Python allows, so that the
exports, clients and requests are checked against its behaviour:

- it runs as its own process (`python -m serving.stand_in_server`, or `launch`);
- each version is loaded as TF Serving loads it: the SavedModel's MetaGraph through the TF1
  session loader (`tf.compat.v1.saved_model.loader.load`, as `saved_model_cli run` does), and its
  SignatureDefs run by feeding and fetching their tensor names in that session, with the
  intra/inter-op thread counts of `--tensorflow_intra_op_parallelism` /
  `--tensorflow_inter_op_parallelism`;
- `assets.extra/tf_serving_warmup_requests` is replayed before a version is marked AVAILABLE (a
  failing warmup request fails the load);
- version policies (`latest {num_versions}`, `specific {versions}`, `all`) and version labels from
  `--model_config_file` (a `ModelServerConfig`, as serving_config/models.config), with new
  versions picked up every `--file_system_poll_wait_seconds` and old ones unloaded once a new one
  is available (a version that fails to load leaves the old one serving);
- `--enable_batching` with `--batching_parameters_file` (serving_config/batching.config): requests
  of a signature are queued, merged up to `max_batch_size` within `batch_timeout_micros` by
  `num_batch_threads` threads, padded to the next of `allowed_batch_sizes` with copies of the
  first task's first row (as TF Serving's BatchingSession pads), run, and split;
- gRPC `tensorflow.serving.PredictionService/Predict`, and REST
  `POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict` (columnar "inputs" or row
  "instances", binary values as {"b64": ...}) and `GET /v1/models/<name>` (version status);
- errors as TF Serving gives them: INVALID_ARGUMENT / HTTP 400 with the reason (the graph's own
  message, which names the request row and feature), NOT_FOUND / HTTP 404 for an unknown model
  or version; a REST read timeout (`--rest_api_timeout_in_ms`).

Where it differs: tasks whose inner shapes differ are put in separate batches (TF Serving, with
`pad_variable_length_inputs: false`, fails such a batch); when a merged batch fails, each of its
tasks is rerun alone, so one bad request does not fail the others batched with it and its error
names its own rows (TF Serving returns the batch's error to every task); an empty request runs
unbatched; there is no monitoring endpoint, no model-config reload, no Classify/Regress APIs.

    python -m serving.stand_in_server --model=encoder=models/encoder --model=ctr=models/ctr \
        [--model_config_file=F] [--enable_batching --batching_parameters_file=F]
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from export import common
from serving import protos as serving_protos
from trainer import console
from trainer.features import versions


class Version:
    """One loaded version: a TF1 session over the SavedModel's serving MetaGraph."""

    def __init__(self, path: str, session_config: tf.compat.v1.ConfigProto | None = None):
        self.path = path
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph, config=session_config)
        with self.graph.as_default():
            meta = tf.compat.v1.saved_model.loader.load(
                self.session, [tf.saved_model.SERVING], path)
        self.signatures = dict(meta.signature_def)

    def signature(self, name: str) -> Any:
        name = name or "serving_default"
        if name not in self.signatures:
            raise ValueError(f"Serving signature name: \"{name}\" not found in signature def "
                             f"(it has {sorted(self.signatures)})")
        return self.signatures[name]

    def input_dtypes(self, signature: str) -> dict:
        return {k: tf.dtypes.as_dtype(v.dtype)
                for k, v in self.signature(signature).inputs.items()}

    def check(self, signature: str, inputs: Mapping[str, np.ndarray]) -> None:
        """The checks TF Serving makes before running: the signature's inputs exactly, each with
        the signature's dtype."""
        want = self.input_dtypes(signature)
        if set(inputs) != set(want):
            raise ValueError(f"input size does not match signature: {len(inputs)}!={len(want)} "
                             f"len({{{', '.join(sorted(inputs))}}}) != "
                             f"len({{{', '.join(sorted(want))}}})")
        for k, v in inputs.items():
            got = tf.string if v.dtype.kind in "OSU" else tf.dtypes.as_dtype(v.dtype)
            if got != want[k]:
                raise ValueError(f"Expects arg '{k}' to be {want[k].name} but {got.name} is "
                                 "provided")

    def run(self, signature: str, inputs: Mapping[str, np.ndarray]) -> dict:
        sig = self.signature(signature)
        feed = {sig.inputs[k].name: v for k, v in inputs.items()}
        fetch = {k: t.name for k, t in sig.outputs.items()}
        return self.session.run(fetch, feed)

    def warm_up(self) -> int:
        """Replays the export's warmup requests; returns how many."""
        path = os.path.join(self.path, "assets.extra", common.WARMUP_FILE)
        if not tf.io.gfile.exists(path):
            return 0
        logs = common.read_warmup(self.path)
        for i, log in enumerate(logs):
            request = log.predict_log.request
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            try:
                self.check(request.model_spec.signature_name, inputs)
                self.run(request.model_spec.signature_name, inputs)
            except (tf.errors.OpError, ValueError) as e:
                raise RuntimeError(f"{path}: warmup request {i} failed: "
                                   f"{getattr(e, 'message', e)}") from e
        return len(logs)

    def close(self) -> None:
        self.session.close()


def _rows(inputs: Mapping[str, np.ndarray]) -> int:
    sizes = {v.shape[0] if v.ndim else -1 for v in inputs.values()}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError("Batching Run() input tensors must have equal 0th-dimension size")
    return sizes.pop()


class _Task:
    def __init__(self, signature: str, inputs: dict):
        self.signature, self.inputs = signature, inputs
        self.rows = _rows(inputs)
        self.shape_key = (signature, tuple(sorted((k, v.shape[1:], v.dtype.str)
                                                  for k, v in inputs.items())))
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.result: dict | None = None
        self.error: BaseException | None = None


class Batcher:
    """TF Serving's server-side batching over one version (module docstring)."""

    def __init__(self, version: Version, params: Any) -> None:
        self.version = version
        self.max_batch_size = params.max_batch_size.value or 1000
        self.timeout = (params.batch_timeout_micros.value or 0) / 1e6
        self.allowed = sorted(params.allowed_batch_sizes)
        self.pending: list[_Task] = []
        self.cond = threading.Condition()
        self.stopped = False
        self.threads = [threading.Thread(target=self._work, daemon=True)
                        for _ in range(max(params.num_batch_threads.value, 1))]
        for t in self.threads:
            t.start()

    def run(self, signature: str, inputs: dict) -> dict:
        task = _Task(signature, inputs)
        if task.rows == 0:  # TF Serving cannot pad an empty task; run it alone
            return self.version.run(signature, inputs)
        if task.rows > self.max_batch_size:
            raise ValueError(f"Task size {task.rows} is larger than maximum input batch size "
                             f"{self.max_batch_size}")
        with self.cond:
            self.pending.append(task)
            self.cond.notify_all()
        task.done.wait()
        if task.error is not None:
            raise task.error
        assert task.result is not None
        return task.result

    def _take(self) -> list[_Task] | None:
        """The next batch: the oldest task and the tasks after it of its shapes that fit, once
        they fill max_batch_size or the oldest has waited batch_timeout_micros."""
        with self.cond:
            while True:
                if self.stopped:
                    return None
                if self.pending:
                    first = self.pending[0]
                    same = [t for t in self.pending if t.shape_key == first.shape_key]
                    batch, rows = [], 0
                    for t in same:
                        if rows + t.rows > self.max_batch_size:
                            break
                        batch.append(t)
                        rows += t.rows
                    wait = first.enqueued + self.timeout - time.monotonic()
                    full = rows == self.max_batch_size or len(batch) < len(same)
                    if full or wait <= 0:
                        for t in batch:
                            self.pending.remove(t)
                        return batch
                    self.cond.wait(wait)
                else:
                    self.cond.wait()

    def _padded_size(self, rows: int) -> int:
        return next((s for s in self.allowed if s >= rows), rows)

    def _run(self, batch: list[_Task]) -> list[dict]:
        rows = sum(t.rows for t in batch)
        pad = self._padded_size(rows) - rows
        merged = {}
        for k in batch[0].inputs:
            parts = [t.inputs[k] for t in batch]
            if pad:  # the first row of the first task, as TF Serving pads
                parts.append(np.repeat(parts[0][:1], pad, axis=0))
            merged[k] = np.concatenate(parts, axis=0)
        out = self.version.run(batch[0].signature, merged)
        results, start = [], 0
        for t in batch:
            results.append({k: v[start:start + t.rows] for k, v in out.items()})
            start += t.rows
        return results

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                for t, r in zip(batch, self._run(batch), strict=True):
                    t.result = r
            except Exception:  # noqa: BLE001  (each task alone, so each gets its own error)
                for t in batch:
                    try:
                        t.result = self._run([t])[0]
                    except Exception as e:  # noqa: BLE001
                        t.error = e
            for t in batch:
                t.done.set()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def _policy(config: Any) -> tuple[str, list]:
    """('latest', [n]) / ('specific', [versions]) / ('all', []) of a model's config."""
    p = config.model_version_policy
    which = p.WhichOneof("policy_choice")
    if which == "specific":
        return "specific", sorted(p.specific.versions)
    if which == "all":
        return "all", []
    return "latest", [p.latest.num_versions or 1] if which == "latest" else [1]


class Servables:
    """The models of a ModelServerConfig, each version loaded per its policy (module docstring).

    models: a ModelServerConfig, or {name: base path} (latest version only).
    """

    def __init__(self, models: Any, session_config: tf.compat.v1.ConfigProto | None = None,
                 batching: Any = None, log: Callable[[str], None] = print) -> None:
        if isinstance(models, Mapping):
            config = model_server_config_pb2.ModelServerConfig()
            for name, base in models.items():
                config.model_config_list.config.add(name=name, base_path=base)
            models = config
        self.configs = {c.name: c for c in models.model_config_list.config}
        self.session_config, self.batching, self.log = session_config, batching, log
        self.loaded: dict[str, dict[int, tuple[Version, Batcher | None]]] = {
            name: {} for name in self.configs}
        self.failed: dict[str, set[int]] = {name: set() for name in self.configs}
        self.lock = threading.Lock()
        for name in self.configs:
            self.sync(name)
            if not self.loaded[name]:
                raise FileNotFoundError(f"model '{name}': no version to serve in "
                                        f"{self.configs[name].base_path}")

    def wanted(self, name: str) -> list[int]:
        found = versions.versions(self.configs[name].base_path)
        kind, values = _policy(self.configs[name])
        if kind == "latest":
            return found[-values[0]:]
        if kind == "specific":
            return [v for v in values if v in found]
        return found

    def sync(self, name: str) -> None:
        """Loads (and warms up) the versions the policy wants that are not loaded, then unloads
        the ones it no longer wants once one it wants is loaded (as TF Serving's availability
        preserving policy: a version that fails to load leaves the old one serving, and is not
        retried)."""
        wanted = self.wanted(name)
        for v in wanted:
            if v in self.loaded[name] or v in self.failed[name]:
                continue
            path = os.path.join(self.configs[name].base_path, str(v))
            t0 = time.time()
            try:
                with console.cpp_noise_dropped():  # TF1 sessions log through absl's C++ logging
                    version = Version(path, self.session_config)
                    n = version.warm_up()
            except Exception:
                self.failed[name].add(v)  # not retried every poll (a new version number is)
                raise
            batcher = Batcher(version, self.batching) if self.batching is not None else None
            with self.lock:
                self.loaded[name][v] = (version, batcher)
            self.log(f"loaded {name} version {v} ({n} warmup requests replayed, "
                     f"{time.time() - t0:.1f}s)")
        if not any(v in self.loaded[name] for v in wanted):
            return  # availability preserving: the old versions serve until a new one loads
        for v in [v for v in self.loaded[name] if v not in wanted]:
            with self.lock:
                version, batcher = self.loaded[name].pop(v)
            if batcher is not None:
                batcher.stop()
            version.close()
            self.log(f"unloaded {name} version {v}")

    def poll(self, seconds: float) -> None:
        """Picks up new versions every `seconds`, in a daemon thread."""
        def loop() -> None:
            while True:
                time.sleep(seconds)
                for name in self.configs:
                    try:
                        self.sync(name)
                    except Exception as e:  # noqa: BLE001  (a bad version must not stop serving)
                        self.log(f"loading a version of {name} failed: {e}")
        threading.Thread(target=loop, daemon=True).start()

    def resolve(self, name: str, version: int | None = None,
                label: str = "") -> tuple[int, Version, Batcher | None]:
        if name not in self.configs:
            raise LookupError(f"Servable not found for request: Latest({name})")
        with self.lock:
            loaded = dict(self.loaded[name])
        if label:
            labels = self.configs[name].version_labels
            if label not in labels:
                raise LookupError(f"Unrecognized servable version label: {label}")
            version = labels[label]
        if version is None:
            if not loaded:
                raise LookupError(f"Servable not found for request: Latest({name})")
            version = max(loaded)
        if version not in loaded:
            raise LookupError(f"Servable not found for request: Specific({name}, {version})")
        return (version, *loaded[version])

    def status(self, name: str) -> list[int]:
        with self.lock:
            return sorted(self.loaded.get(name, {}))

    def predict(self, name: str, signature: str, inputs: dict, version: int | None = None,
                label: str = "") -> tuple[int, dict]:
        v, loaded, batcher = self.resolve(name, version, label)
        loaded.check(signature, inputs)
        run = batcher.run if batcher is not None else loaded.run
        return v, run(signature or "serving_default", inputs)

    def run(self, request: predict_pb2.PredictRequest) -> tuple[int, dict]:
        spec = request.model_spec
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        return self.predict(spec.name, spec.signature_name, inputs,
                            spec.version.value if spec.HasField("version") else None,
                            spec.version_label)


_ERRORS = (tf.errors.OpError, KeyError, TypeError, ValueError)


def _message(e: BaseException) -> str:
    return getattr(e, "message", None) or str(e)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, servables: Servables):
        self.servables = servables

    def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802  (the gRPC method's name)
        import grpc
        try:
            version, outputs = self.servables.run(request)
        except LookupError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except _ERRORS as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(e))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version
        response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
        for k, v in outputs.items():
            response.outputs[k].CopyFrom(tf.make_tensor_proto(v))
        return response


def start_grpc(servables: Servables, port: int = 0, threads: int = 8) -> tuple:
    """(server, port): a started gRPC server on 127.0.0.1 (port 0: any free port)."""
    import grpc
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=[
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(servables), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _from_json(value: Any) -> Any:
    """A JSON value of the REST API as numpy ({"b64": ...} -> bytes)."""
    if _is_b64(value):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError) as e:
            raise ValueError(f"a 'b64' value is not base64: {e}") from None
    if isinstance(value, list):
        items = [_from_json(v) for v in value]
        if items and all(isinstance(i, bytes) for i in items):
            return np.array(items, dtype=object)
        if items and all(isinstance(i, np.ndarray) and i.dtype == object for i in items):
            if len({len(i) for i in items}) == 1:
                return np.stack(items)
        return np.array(items)
    return value


def _ragged(rows: list) -> str | None:
    """Which row of a list of rows has another length than the first, if one has."""
    lengths = [len(r) if isinstance(r, list) else None for r in rows]
    for i, n in enumerate(lengths):
        if n != lengths[0]:
            return f"instances[{i}] has {n} values, instances[0] has {lengths[0]}"
    return None


def _to_json(value: np.ndarray) -> Any:
    if value.dtype == object:
        return [{"b64": base64.b64encode(b).decode()} for b in value.tolist()]
    return value.tolist()


class _BadRequest(ValueError):
    """A REST request the server answers with 400 and this reason."""


def _inputs_of(body: Any, dtypes: Mapping) -> dict:
    """{input name: numpy value} of a REST predict body, in the columnar ("inputs") or the row
    ("instances") format, with the signature's dtypes (JSON numbers carry none)."""
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object with 'inputs' or 'instances'")
    if "inputs" in body:
        inputs = body["inputs"]
    elif "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list):
            raise _BadRequest("'instances' must be a list of rows")
        named = bool(rows) and all(isinstance(r, dict) and not _is_b64(r) for r in rows)
        if named:
            keys = set(rows[0])
            for i, r in enumerate(rows):
                if set(r) != keys:
                    raise _BadRequest(f"instances[{i}] has inputs {sorted(r)}, instances[0] "
                                      f"has {sorted(keys)}")
            inputs = {k: [r[k] for r in rows] for k in rows[0]}
        else:
            inputs = rows
    else:
        raise _BadRequest("the body needs 'inputs' or 'instances'")
    if not isinstance(inputs, dict):
        if len(dtypes) != 1:
            raise _BadRequest(f"unnamed inputs need a one-input signature; this one takes "
                              f"{sorted(dtypes)}")
        inputs = {next(iter(dtypes)): inputs}
    values = {}
    for k, v in inputs.items():
        if k not in dtypes:
            raise _BadRequest(f"the signature has no input '{k}' (it takes {sorted(dtypes)})")
        if isinstance(v, list) and (uneven := _ragged(v)):
            raise _BadRequest(f"input '{k}': {uneven}")
        try:
            v = _from_json(v)
            if dtypes[k] != tf.string:
                v = np.asarray(v, dtypes[k].as_numpy_dtype)
            elif not isinstance(v, np.ndarray) or v.size == 0:  # [] carries no type
                v = np.array(v, dtype=object)
        except (ValueError, TypeError) as e:
            raise _BadRequest(f"input '{k}': {e}") from None
        values[k] = v
    return values


_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?(:predict)?$")


def _rest_handler(servables: Servables, timeout_seconds: float
                  ) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_seconds  # a client that stops sending mid-request is dropped

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _target(self, predict: bool) -> tuple[str, int | None, str] | None:
            m = _PATH.match(self.path)
            if m is None or bool(m.group(4)) != predict:
                return None
            return m.group(1), int(m.group(2)) if m.group(2) else None, m.group(3) or ""

        def do_GET(self) -> None:  # noqa: N802  (model status, as TF Serving's REST API)
            target = self._target(predict=False)
            if target is None:
                return self._reply(404, {"error": f"unknown path {self.path}"})
            name, version, _ = target
            loaded = servables.status(name)
            if not loaded or version not in (None, *loaded):
                return self._reply(404, {"error": f"Servable not found: {name}"})
            return self._reply(200, {"model_version_status": [{
                "version": str(v), "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""}}
                for v in reversed(loaded) if version in (None, v)]})

        def do_POST(self) -> None:  # noqa: N802
            target = self._target(predict=True)
            if target is None:
                return self._reply(404, {"error": f"unknown path {self.path}"})
            name, version, label = target
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._reply(411, {"error": "the request needs a Content-Length"})
            try:
                body = json.loads(self.rfile.read(length))
            except TimeoutError:
                return  # the client stopped sending: the connection is closed
            except (ValueError, UnicodeDecodeError) as e:
                return self._reply(400, {"error": f"the body is not JSON: {e}"})
            signature = (body.get("signature_name", "serving_default")
                         if isinstance(body, dict) else "serving_default")
            try:
                resolved, loaded, _ = servables.resolve(name, version, label)
                values = _inputs_of(body, loaded.input_dtypes(signature))
                _, outputs = servables.predict(name, signature, values, resolved)
            except LookupError as e:
                return self._reply(404, {"error": str(e)})
            except _ERRORS as e:
                return self._reply(400, {"error": _message(e)})
            if "instances" in body:
                n = len(next(iter(outputs.values())))
                preds = [{k: _to_json(v[i:i + 1])[0] for k, v in outputs.items()}
                         for i in range(n)]
                if len(outputs) == 1:
                    preds = [next(iter(p.values())) for p in preds]
                return self._reply(200, {"predictions": preds})
            return self._reply(200, {"outputs": {k: _to_json(v) for k, v in outputs.items()}})

    return Handler


def start_rest(servables: Servables, port: int = 0, timeout_seconds: float = 30.0) -> tuple:
    """(server, port): a REST server on 127.0.0.1 running in a daemon thread; a connection that
    sends nothing for `timeout_seconds` is closed."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _rest_handler(servables, timeout_seconds))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


READY = "STAND-IN model server ready"


def launch(args: Sequence[str], env: Mapping[str, str] | None = None,
           timeout: float = 600) -> tuple[subprocess.Popen, int, int]:
    """Starts the stand-in as its own process with these flags (ports 0: free ones) and waits
    until it reports ready (every version loaded and warmed up): (process, gRPC port, REST
    port). Stop it with `process.terminate()`."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    flags = ["--port=0", "--rest_api_port=0", *args]
    proc = subprocess.Popen([sys.executable, "-m", "serving.stand_in_server", *flags], cwd=repo,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines: list[str] = []
    deadline = time.time() + timeout
    assert proc.stdout is not None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(READY + r": gRPC 127.0.0.1:(\d+), REST 127.0.0.1:(\d+)", line)
        if m:
            # Keep reading its log (into `proc.log`), so a full pipe never blocks it.
            threading.Thread(target=lambda: lines.extend(proc.stdout),  # type: ignore[arg-type]
                             daemon=True).start()
            proc.log = lines  # type: ignore[attr-defined]
            return proc, int(m.group(1)), int(m.group(2))
    proc.kill()
    raise RuntimeError("the stand-in server did not start:\n" + "".join(lines[-40:]))


def main(argv: list[str]) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    if f.model_config_file:
        config = serving_protos.parse_models_config(f.model_config_file)
    else:
        config = model_server_config_pb2.ModelServerConfig()
    for m in f.model:
        name, _, base = m.partition("=")
        config.model_config_list.config.add(name=name, base_path=base)
    session_config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=f.tensorflow_intra_op_parallelism,
        inter_op_parallelism_threads=f.tensorflow_inter_op_parallelism)
    batching = (serving_protos.parse_batching_config(f.batching_parameters_file)
                if f.enable_batching else None)
    if f.enable_batching and not f.batching_parameters_file:
        raise ValueError("--enable_batching needs --batching_parameters_file here")
    servables = Servables(config, session_config, batching,
                          log=lambda s: print(s, flush=True))
    if f.file_system_poll_wait_seconds > 0:
        servables.poll(f.file_system_poll_wait_seconds)
    grpc_server, grpc_port = start_grpc(servables, f.port, f.grpc_threads)
    _, rest_port = start_rest(servables, f.rest_api_port, f.rest_api_timeout_in_ms / 1000)
    print(f"{READY}: gRPC 127.0.0.1:{grpc_port}, REST 127.0.0.1:{rest_port} (not "
          "tensorflow_model_server); models " + ", ".join(
              f"{n} {servables.status(n)}" for n in servables.configs), flush=True)
    grpc_server.wait_for_termination()


if __name__ == "__main__":
    from absl import flags
    flags.DEFINE_multi_string("model", [], "NAME=BASE_PATH of an exported model (its latest "
                              "version), besides --model_config_file's.")
    flags.DEFINE_string("model_config_file", "", "A ModelServerConfig text proto (base paths, "
                        "version policies and labels).")
    flags.DEFINE_integer("port", 8500, "gRPC port (0: a free one).")
    flags.DEFINE_integer("rest_api_port", 8501, "REST port (0: a free one).")
    flags.DEFINE_integer("rest_api_timeout_in_ms", 30000, "REST read timeout.")
    flags.DEFINE_bool("enable_batching", False, "Server-side batching.")
    flags.DEFINE_string("batching_parameters_file", "", "BatchingParameters text proto.")
    flags.DEFINE_integer("tensorflow_intra_op_parallelism", 0, "Threads within an op (0: "
                         "TensorFlow's default, all cores).")
    flags.DEFINE_integer("tensorflow_inter_op_parallelism", 0, "Ops run at once (0: default).")
    flags.DEFINE_integer("file_system_poll_wait_seconds", 1, "How often new versions are "
                         "looked for (0: never).")
    flags.DEFINE_integer("grpc_threads", 8, "gRPC request threads.")
    console.absl_run(main)
