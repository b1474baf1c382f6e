"""What both exports share: numbered version directories written atomically, TF Serving warmup
records, and the export's provenance.

TF Serving watches a model's base path and loads the highest numeric subdirectory, so a version
is written under a temporary name and renamed into place once complete: the server never sees a
half-written model.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from trainer import console
from trainer.data import jsonfile
from trainer.features import versions

WARMUP_FILE = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving reads at most this many
EXPORT_INFO = "export_info.json"  # in assets.extra: where a version comes from


def predict_request(model_name: str, signature: str,
                    inputs: Mapping[str, np.ndarray]) -> predict_pb2.PredictRequest:
    """A `PredictRequest` for one signature with numpy inputs."""
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def warmup_logs(requests: Iterable[predict_pb2.PredictRequest]) -> list:
    return [prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=r)) for r in requests]


def export_info(version_dir: str) -> dict:
    """What an export version records of itself (`assets.extra/export_info.json`)."""
    info = jsonfile.read(os.path.join(version_dir, "assets.extra", EXPORT_INFO))
    if info is None:
        raise FileNotFoundError(f"{version_dir} has no assets.extra/{EXPORT_INFO}: not an "
                                "export of this project")
    return info


def min_model_server(tensorflow: str) -> str:
    """The oldest TF Serving that runs a SavedModel written by TensorFlow `tensorflow`: the same
    minor release (a model exported by TF 2.x runs on TF Serving 2.y for y >= x,
    tensorflow/serving#2168)."""
    major, minor = tensorflow.split(".")[:2]
    return f"{major}.{minor}.0"


def save(module: tf.Module, signatures: dict, export_dir: str, warmup: list, info: dict,
         version: int | None = None, extra_files: dict | None = None) -> str:
    """Saves `module` with `signatures` as version `version` (default: latest + 1) of
    `export_dir`, with `assets.extra/tf_serving_warmup_requests` (the `PredictionLog`s of
    `warmup`), `assets.extra/export_info.json` and `extra_files` ({name: text}) beside them.
    Returns the version directory."""
    if len(warmup) > MAX_WARMUP_RECORDS:
        raise ValueError(f"{len(warmup)} warmup records; TF Serving reads at most "
                         f"{MAX_WARMUP_RECORDS}")
    version = version if version is not None else (versions.versions(export_dir) or [0])[-1] + 1
    final = os.path.join(export_dir, str(version))
    if tf.io.gfile.exists(final):
        raise FileExistsError(f"{final} exists; versions are immutable (choose another "
                              "--version or leave it unset for the next one)")
    tmp = os.path.join(export_dir, f".tmp-{version}-{os.getpid()}")
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    tf.saved_model.save(module, tmp, signatures=signatures)
    extra = os.path.join(tmp, "assets.extra")
    tf.io.gfile.makedirs(extra)
    with tf.io.TFRecordWriter(os.path.join(extra, WARMUP_FILE)) as w:
        for log in warmup:
            w.write(log.SerializeToString())
    with tf.io.gfile.GFile(os.path.join(extra, EXPORT_INFO), "w") as f:
        json.dump({**info, "version": version, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "tensorflow": tf.__version__,
                   "min_model_server": min_model_server(tf.__version__)}, f, indent=2)
    for name, text in (extra_files or {}).items():
        with tf.io.gfile.GFile(os.path.join(extra, name), "w") as f:
            f.write(text)
    tf.io.gfile.rename(tmp, final)
    return final


def read_warmup(version_dir: str) -> list:
    """The `PredictionLog`s of an export's warmup file."""
    path = os.path.join(version_dir, "assets.extra", WARMUP_FILE)
    out = []
    for i, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
        log = prediction_log_pb2.PredictionLog()
        try:
            log.ParseFromString(record)
        except Exception as e:  # noqa: BLE001  (protobuf's DecodeError)
            raise ValueError(f"{path}:{i}: not a PredictionLog: {e}") from e
        out.append(log)
    return out


def run_request(loaded, request: predict_pb2.PredictRequest) -> dict:
    """Runs a `PredictRequest` against a `tf.saved_model.load`ed model as TF Serving would:
    {output name: numpy array}."""
    name = request.model_spec.signature_name or "serving_default"
    if name not in loaded.signatures:
        raise KeyError(f"the model has no signature '{name}' (it has "
                       f"{sorted(loaded.signatures)})")
    inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
    return {k: v.numpy() for k, v in loaded.signatures[name](**inputs).items()}


def main(export_fn: Callable[..., str], what: str, model_name: str, model_dir_help: str,
         signatures: str, options: Mapping[str, tuple[int | str | None, str]] | None = None
         ) -> None:
    """The command line of `python -m export.encoder` / `export.ctr`: `export_fn(model_dir,
    export_dir, version, model_name, **options)` from flags; `options` are the export's own
    flags (name -> (default, help)): integers where the default is one, else strings."""
    from absl import flags
    flags.DEFINE_string("model_dir", None, model_dir_help)
    flags.DEFINE_string("export_dir", None, "Model base path; the export is its next version.")
    flags.DEFINE_integer("version", None, "Version number (default: latest + 1).")
    flags.DEFINE_string("model_name", model_name, "Model name in the warmup requests (as in "
                        "serving_config/models.config).")
    for name, (default, help_) in (options or {}).items():
        if isinstance(default, int):
            flags.DEFINE_integer(name, default, help_)
        else:
            flags.DEFINE_string(name, default, help_)
    flags.mark_flags_as_required(["model_dir", "export_dir"])

    def run(argv) -> None:
        del argv
        f = flags.FLAGS
        path = export_fn(f.model_dir, f.export_dir, f.version, f.model_name,
                         **{name: getattr(f, name) for name in options or {}})
        print(f"exported {what} of {f.model_dir} to {path} (signatures: {signatures})")

    console.absl_run(run)
