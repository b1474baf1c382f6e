"""A STAND-IN for TF Serving's model server, for tests and local trials only.

`tensorflow_model_server` is not installable from the package registries (README, "Serving"), so
this module serves loaded SavedModels in-process behind the same two interfaces, so that clients
(`export.client`, `scripts/serving_client.py`) and requests can be checked without it:

- gRPC `tensorflow.serving.PredictionService/Predict` (tensorflow-serving-api's service stub);
- REST `POST /v1/models/<name>[/versions/<v>]:predict` with the columnar "inputs" or the row
  "instances" format, binary values as {"b64": ...}.

It does what the real server does for these calls (latest numeric version, signature by name,
`serving_default` when unnamed, errors as INVALID_ARGUMENT / HTTP 400 with the reason, an unknown
model as NOT_FOUND / HTTP 404, `GET /v1/models/<name>` status, a REST read timeout as
`--rest_api_timeout_in_ms`) and nothing else: no batching, no version policy, no monitoring.

    python -m export.stand_in_server --model=encoder=models/encoder --model=ctr=models/ctr
"""
from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Mapping
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from export import common
from trainer.features import versions


class Servables:
    """The latest version of each named model base path, loaded."""

    def __init__(self, base_paths: Mapping[str, str]):
        self.models = {}
        for name, base in base_paths.items():
            path = versions.latest_version_dir(base)
            self.models[name] = (int(os.path.basename(path)), tf.saved_model.load(path))

    def run(self, request: predict_pb2.PredictRequest) -> tuple[int, dict]:
        name = request.model_spec.name
        if name not in self.models:
            raise LookupError(f"Servable not found for request: Latest({name})")
        version, loaded = self.models[name]
        if request.model_spec.HasField("version") and request.model_spec.version.value != version:
            raise LookupError(f"Servable not found for request: Specific({name}, "
                              f"{request.model_spec.version.value})")
        return version, common.run_request(loaded, request)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, servables: Servables):
        self.servables = servables

    def Predict(self, request, context):  # noqa: N802  (the gRPC method's name)
        import grpc
        try:
            version, outputs = self.servables.run(request)
        except LookupError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except (tf.errors.InvalidArgumentError, KeyError, TypeError, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, getattr(e, "message", str(e)))
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        response.model_spec.version.value = version
        response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
        for k, v in outputs.items():
            response.outputs[k].CopyFrom(tf.make_tensor_proto(v))
        return response


def start_grpc(servables: Servables, port: int = 0) -> tuple:
    """(server, port): a started gRPC server on 127.0.0.1 (port 0: any free port)."""
    import grpc
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(servables), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


def _is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _from_json(value):
    """A JSON value of the REST API as numpy ({"b64": ...} -> bytes)."""
    if _is_b64(value):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError) as e:
            raise ValueError(f"a 'b64' value is not base64: {e}") from None
    if isinstance(value, list):
        items = [_from_json(v) for v in value]
        if items and isinstance(items[0], bytes):
            return np.array(items, dtype=object)
        return np.array(items)
    return value


def _to_json(value: np.ndarray):
    if value.dtype == object:
        return [{"b64": base64.b64encode(b).decode()} for b in value.tolist()]
    return value.tolist()


class _BadRequest(ValueError):
    """A REST request the server answers with 400 and this reason."""


def _inputs_of(body, specs: Mapping) -> dict:
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
        if len(specs) != 1:
            raise _BadRequest(f"unnamed inputs need a one-input signature; this one takes "
                              f"{sorted(specs)}")
        inputs = {next(iter(specs)): inputs}
    values = {}
    for k, v in inputs.items():
        if k not in specs:
            raise _BadRequest(f"the signature has no input '{k}' (it takes {sorted(specs)})")
        try:
            v = _from_json(v)
            if specs[k].dtype != tf.string:
                v = np.asarray(v, specs[k].dtype.as_numpy_dtype)
        except (ValueError, TypeError) as e:
            raise _BadRequest(f"input '{k}': {e}") from None
        values[k] = v
    return values


def _rest_handler(servables: Servables, timeout_seconds: float):
    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_seconds  # a client that stops sending mid-request is dropped

        def log_message(self, *args):  # quiet
            pass

        def _reply(self, code: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _model(self, suffix: str) -> tuple[str, int | None] | None:
            """(name, version or None) of /v1/models/<name>[/versions/<v>]<suffix>."""
            path = self.path
            if not (path.startswith("/v1/models/") and path.endswith(suffix)):
                return None
            parts = path[len("/v1/models/"):len(path) - len(suffix)].split("/")
            if len(parts) == 1 and parts[0]:
                return parts[0], None
            if len(parts) == 3 and parts[1] == "versions" and parts[2].isdigit():
                return parts[0], int(parts[2])
            return None

        def do_GET(self):  # noqa: N802  (model status, as TF Serving's REST API)
            target = self._model("")
            if target is None:
                return self._reply(404, {"error": f"unknown path {self.path}"})
            name, version = target
            if name not in servables.models or version not in (None, servables.models[name][0]):
                return self._reply(404, {"error": f"Servable not found: {name}"})
            return self._reply(200, {"model_version_status": [{
                "version": str(servables.models[name][0]), "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""}}]})

        def do_POST(self):  # noqa: N802
            target = self._model(":predict")
            if target is None:
                return self._reply(404, {"error": f"unknown path {self.path}"})
            name, version = target
            if name not in servables.models:
                return self._reply(404, {"error": f"Servable not found for request: "
                                                  f"Latest({name})"})
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
            signatures = servables.models[name][1].signatures
            if signature not in signatures:
                return self._reply(400, {"error": f"the model has no signature '{signature}' "
                                                  f"(it has {sorted(signatures)})"})
            sig = signatures[signature]
            try:
                values = _inputs_of(body, sig.structured_input_signature[1])
            except _BadRequest as e:
                return self._reply(400, {"error": str(e)})
            request = common.predict_request(name, signature, values)
            if version is not None:
                request.model_spec.version.value = version
            try:
                _, outputs = servables.run(request)
            except LookupError as e:
                return self._reply(404, {"error": str(e)})
            except (tf.errors.InvalidArgumentError, KeyError, TypeError, ValueError) as e:
                return self._reply(400, {"error": getattr(e, "message", str(e))})
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


def main(argv) -> None:
    del argv
    from absl import flags
    models = dict(m.split("=", 1) for m in flags.FLAGS.model)
    servables = Servables(models)
    grpc_server, grpc_port = start_grpc(servables, flags.FLAGS.port)
    _, rest_port = start_rest(servables, flags.FLAGS.rest_api_port,
                              flags.FLAGS.rest_api_timeout_in_ms / 1000)
    print(f"STAND-IN model server (not tensorflow_model_server): gRPC 127.0.0.1:{grpc_port}, "
          f"REST 127.0.0.1:{rest_port}; models "
          + ", ".join(f"{n} v{v}" for n, (v, _) in servables.models.items()), flush=True)
    grpc_server.wait_for_termination()


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_multi_string("model", [], "NAME=BASE_PATH of an exported model.")
    flags.DEFINE_integer("port", 8500, "gRPC port.")
    flags.DEFINE_integer("rest_api_port", 8501, "REST port.")
    flags.DEFINE_integer("rest_api_timeout_in_ms", 30000, "REST read timeout (as the model "
                         "server's flag of that name).")
    app.run(main)
