"""Checks of the TF Serving configuration files in `serving_config/` against their protos.

`models.config` is parsed as tensorflow-serving-api's `ModelServerConfig`. The batching and
monitoring files are text protos of messages that package does not ship (`BatchingParameters` of
tensorflow_serving/servables/tensorflow/session_bundle_config.proto and `MonitoringConfig` of
tensorflow_serving/config/monitoring_config.proto), so their fields, as TF Serving documents them,
are declared here and the files parsed strictly: an unknown or misspelled field fails.
"""
from __future__ import annotations

import os
from typing import Any

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
    wrappers_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

_F = descriptor_pb2.FieldDescriptorProto

# name, number, type, label, message type (for wrapper/nested fields)
_BATCHING_FIELDS = (
    ("max_batch_size", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
    ("batch_timeout_micros", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
    ("max_enqueued_batches", 3, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
    ("num_batch_threads", 4, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
    ("thread_pool_name", 5, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.StringValue"),
    ("allowed_batch_sizes", 6, _F.TYPE_INT64, _F.LABEL_REPEATED, None),
    ("pad_variable_length_inputs", 7, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
    ("enable_large_batch_splitting", 8, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL,
     ".google.protobuf.BoolValue"),
    ("max_execution_batch_size", 9, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL,
     ".google.protobuf.Int64Value"),
)
_PROMETHEUS_FIELDS = (
    ("enable", 1, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
    ("path", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
)
_MONITORING_FIELDS = (
    ("prometheus_config", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL,
     ".tensorflow.serving.PrometheusConfig"),
)


def _messages() -> dict:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    f = descriptor_pb2.FileDescriptorProto(name="serving_config_check.proto",
                                           package="tensorflow.serving", syntax="proto3",
                                           dependency=["google/protobuf/wrappers.proto"])
    for name, fields in (("BatchingParameters", _BATCHING_FIELDS),
                         ("PrometheusConfig", _PROMETHEUS_FIELDS),
                         ("MonitoringConfig", _MONITORING_FIELDS)):
        msg = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name
    pool.Add(f)
    return {n: message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"tensorflow.serving.{n}"))
        for n in ("BatchingParameters", "MonitoringConfig")}


def _parse(path: str, message: Any) -> Any:
    with open(path) as fh:
        text = fh.read()
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ValueError(f"{path}: not a valid {message.DESCRIPTOR.name}: {e}") from e


def parse_models_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    return _parse(path, model_server_config_pb2.ModelServerConfig())


def parse_batching_config(path: str) -> Any:
    return _parse(path, _messages()["BatchingParameters"]())


def parse_monitoring_config(path: str) -> Any:
    return _parse(path, _messages()["MonitoringConfig"]())


def check_config_dir(config_dir: str) -> dict:
    """Parses the three files of a serving configuration directory; returns the messages."""
    out = {"models": parse_models_config(os.path.join(config_dir, "models.config")),
           "batching": parse_batching_config(os.path.join(config_dir, "batching.config")),
           "monitoring": parse_monitoring_config(os.path.join(config_dir, "monitoring.config"))}
    b = out["batching"]
    if b.allowed_batch_sizes and b.allowed_batch_sizes[-1] != b.max_batch_size.value:
        raise ValueError(f"{config_dir}/batching.config: the last allowed_batch_sizes entry must "
                         f"equal max_batch_size ({b.max_batch_size.value}), as TF Serving requires")
    return out
