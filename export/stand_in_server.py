"""A STAND-IN for TF Serving's model server, for tests and local trials only.

`tensorflow_model_server` is not installable from the package registries (README, "Serving"), so
this module serves loaded SavedModels in-process behind the same two interfaces, so that clients
(`export.client`, `scripts/serving_client.py`) and requests can be checked without it:

- gRPC `tensorflow.serving.PredictionService/Predict` (tensorflow-serving-api's service stub);
- REST `POST /v1/models/<name>[/versions/<v>]:predict` with the columnar "inputs" or the row
  "instances" format, binary values as {"b64": ...}.

It does what the real server does for these calls (latest numeric version, signature by name,
`serving_default` when unnamed, errors as INVALID_ARGUMENT / HTTP 400) and nothing else: no
batching, no version policy, no monitoring.

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


def _from_json(value):
    """A JSON value of the REST API as numpy ({"b64": ...} -> bytes)."""
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
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


def _rest_handler(servables: Servables):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _reply(self, code: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802
            path = self.path
            if not (path.startswith("/v1/models/") and path.endswith(":predict")):
                return self._reply(404, {"error": f"unknown path {path}"})
            parts = path[len("/v1/models/"):-len(":predict")].split("/")
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            signature = body.get("signature_name", "serving_default")
            if "inputs" in body:
                inputs = body["inputs"]
            elif "instances" in body:
                rows = body["instances"]
                inputs = ({k: [r[k] for r in rows] for k in rows[0]}
                          if rows and isinstance(rows[0], dict) else rows)
            else:
                return self._reply(400, {"error": "body needs 'inputs' or 'instances'"})
            loaded = servables.models.get(parts[0], (0, None))[1]
            sig = loaded.signatures.get(signature) if loaded else None
            specs = sig.structured_input_signature[1] if sig is not None else {}
            if not isinstance(inputs, dict):
                if len(specs) != 1:
                    return self._reply(400, {"error": "unnamed inputs need a one-input signature"})
                inputs = {next(iter(specs)): inputs}
            # JSON numbers carry no dtype: take the signature's, as the model server does.
            values = {}
            for k, v in inputs.items():
                v = _from_json(v)
                if k in specs and specs[k].dtype != tf.string:
                    v = np.asarray(v, specs[k].dtype.as_numpy_dtype)
                values[k] = v
            request = common.predict_request(parts[0], signature, values)
            if len(parts) == 3 and parts[1] == "versions":
                request.model_spec.version.value = int(parts[2])
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


def start_rest(servables: Servables, port: int = 0) -> tuple:
    """(server, port): a REST server on 127.0.0.1 running in a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _rest_handler(servables))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def main(argv) -> None:
    del argv
    from absl import flags
    models = dict(m.split("=", 1) for m in flags.FLAGS.model)
    servables = Servables(models)
    grpc_server, grpc_port = start_grpc(servables, flags.FLAGS.port)
    _, rest_port = start_rest(servables, flags.FLAGS.rest_api_port)
    print(f"STAND-IN model server (not tensorflow_model_server): gRPC 127.0.0.1:{grpc_port}, "
          f"REST 127.0.0.1:{rest_port}; models "
          + ", ".join(f"{n} v{v}" for n, (v, _) in servables.models.items()), flush=True)
    grpc_server.wait_for_termination()


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_multi_string("model", [], "NAME=BASE_PATH of an exported model.")
    flags.DEFINE_integer("port", 8500, "gRPC port.")
    flags.DEFINE_integer("rest_api_port", 8501, "REST port.")
    app.run(main)
