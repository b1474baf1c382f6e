"""Shared fixtures: a tiny synthetic world per test session, and helpers to read records."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import numpy as np
import pytest
import tensorflow as tf

# Two logical CPU devices, so distribution tests can run MirroredStrategy on one machine. This must
# happen before TensorFlow initialises its devices, i.e. at import of the test session.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

from trainer.ctr import spec as ctr_spec  # noqa: E402
from trainer.data import pipeline, records  # noqa: E402
from trainer.synth import config, marketplace  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def mirrored() -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy over the 2 logical CPUs for the whole session: a second instance in
    the same process reuses collective instance keys and trips over the first one's shapes."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def shared_dir(tmp_path_factory, name: str, key: object, build: Callable[[str], None]) -> str:
    """A directory built once for the whole test run, whichever pytest-xdist worker asks first
    (the others wait for it and reuse it): `build(path)` fills it. Keyed by `name` and `key`
    (what it is built from, e.g. a config), so that another key builds another directory.
    Tests read it and may add caches (written atomically), but never change what it holds."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=repr).encode()).hexdigest()
    path = root / f"shared-{name}-{digest[:12]}"
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (path / ".built").exists():
            if path.exists():  # a build that failed half way
                shutil.rmtree(path)
            build(str(path))
            (path / ".built").touch()
    return str(path)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> str:
    """The `tiny` world, seed 0, compact layout (images joined from the catalog): one for the
    whole run."""
    return shared_dir(tmp_path_factory, "tiny", {"world": "tiny", "seed": 0}, generate_tiny)


def generate_tiny(data_dir: str, seed: int = 0, **options) -> dict:
    """A `tiny` world in `data_dir`, its `ctr` records with the synthetic spec's columns."""
    return marketplace.generate(config.get_world("tiny"), data_dir, seed=seed,
                                ctr_kind=ctr_spec.record_kind("ctr"), **options)


@pytest.fixture(scope="session")
def encoder_dir(tiny_world, tmp_path_factory) -> str:
    """A (briefly) trained S1 encoder model dir on the tiny world, as the CTR stages take it:
    one for the whole run."""
    from trainer import configs
    from trainer.models import pretrain
    from trainer.train import loop
    enc = configs.EncoderConfig(depth=10, width_multiplier=0.5, image_size=32, feature_dim=32)
    train = configs.TrainConfig(steps=3, global_batch_size=16, log_interval=3, warmup_steps=0)

    def build(model_dir: str) -> None:
        task = pretrain.PretrainTask(configs.PretrainConfig(
            catalog_pattern=records.default_pattern(tiny_world, "catalog")), enc, train)
        loop.run(task, train, model_dir)
        configs.save(model_dir, configs.PretrainStage(model_dir=model_dir, encoder=enc,
                                                      train=train))

    return shared_dir(tmp_path_factory, "s1", {"world": tiny_world, "encoder": enc,
                                              "train": train}, build)


def read_all(data_dir: str, kind, split: str = "*", image_size: int = 32, **overrides) -> dict:
    """Every record of one kind (a name, or a `RecordKind` such as a feature spec's `ctr`), in
    file order, as numpy arrays (one pass, no shuffling)."""
    name = kind if isinstance(kind, str) else kind.name
    kind = ctr_spec.record_kind(kind) if isinstance(kind, str) else kind
    cfg = pipeline.InputConfig(records.default_pattern(data_dir, name, split), kind,
                               global_batch_size=256, image_size=image_size, shuffle=False,
                               repeat=False, drop_remainder=False, deterministic=True,
                               catalog_pattern=records.default_pattern(data_dir, "catalog"),
                               **overrides)
    pipe = pipeline.InputPipeline(cfg)
    parts: dict = {}
    with pipe.errors_named():
        for batch in pipe.dataset():
            for k, v in batch.items():
                parts.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def one_step_on_one_and_two_replicas(make, train, mirrored, model_of, seed: int = 0) -> tuple:
    """Builds `make()`'s model, then applies one step to the same first batch on one device and
    on `mirrored` from the same weights; asserts equal losses and weights and returns
    (start weights, weights after the step) for further checks."""
    import tf_keras

    from trainer.train import loop
    # Seeded: some random initialisations amplify float rounding through synchronised batch norm
    # (1e-3 after one step), and the global generator's state depends on the tests run before.
    tf_keras.utils.set_random_seed(seed)
    task = make()
    batch = {k: v.numpy() for k, v in next(iter(task.build_inputs(None))).items()}
    task.build_model()
    model = model_of(task)
    start = [v.numpy() for v in loop.trainable_variables(task, model)
             + model.non_trainable_variables]
    loss_1, w_1 = loop.one_step(make(), train, tf.distribute.OneDeviceStrategy("/cpu:0"), batch,
                                weights=start)
    loss_2, w_2 = loop.one_step(make(), train, mirrored, batch, weights=start)
    # 1e-5 relative: float32 sums in another order (COURIER's loss is about 9).
    assert abs(loss_1 - loss_2) < 1e-5 * max(1.0, abs(loss_1)), (loss_1, loss_2)
    for a, b in zip(w_1, w_2, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    return start, w_1


def write_records(path: str, recs) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as w:
        for r in recs:
            w.write(r)
    return path


def raw_records(pattern: str) -> list[bytes]:
    return [r.numpy() for r in tf.data.TFRecordDataset(pipeline.list_files(pattern))]


def with_bad_value(pattern: str, path: str, feature: str, value, n: int = 20,
                   index: int = 7) -> str:
    """The first `n` records of `pattern` written to `path`, record `index`'s `feature` (a float
    or int64 list, kept so) set to [value]: a bad record for the errors that name it."""
    from tensorflow.core.example import example_pb2
    recs = raw_records(pattern)[:n]
    example = example_pb2.Example.FromString(recs[index])
    f = example.features.feature[feature]
    (f.float_list if f.HasField("float_list") else f.int64_list).value[:] = [value]
    recs[index] = example.SerializeToString()
    return write_records(path, recs)


@pytest.fixture(scope="session")
def trained(tiny_world, tmp_path_factory) -> dict:
    """A briefly trained encoder and two CTR models on its features, through the stages' own
    runners (vector + D, and cluster_id), trained once for the whole run: model dirs, the
    encoder's embedding table and the restored CTR models."""
    from export_helpers import ENC, ctr_config
    from trainer import configs, registry
    from trainer.ctr import task as ctr_task
    from trainer.features import embeddings
    enc_train = configs.TrainConfig(steps=3, global_batch_size=16, log_interval=3, warmup_steps=0)

    def build(root: str) -> None:
        enc_dir = os.path.join(root, "s1")
        registry.run(configs.PretrainStage(data_dir=tiny_world, model_dir=enc_dir, encoder=ENC,
                                           train=enc_train))
        registry.run(ctr_config(tiny_world, os.path.join(root, "debias"), "debias",
                                images__encoder="s1", images__model_dir=enc_dir,
                                images__s1_model_dir=enc_dir))
        registry.run(ctr_config(tiny_world, os.path.join(root, "cluster"), images__encoder="s1",
                                images__model_dir=enc_dir,
                                ctr__image_feature_mode="cluster_id", cluster__num_clusters=4))

    root = shared_dir(tmp_path_factory, "trained", {"world": tiny_world, "encoder": ENC,
                                                    "train": enc_train,
                                                    "ctr": ctr_config(tiny_world, "")}, build)
    enc_dir = os.path.join(root, "s1")
    out: dict = {"encoder": enc_dir, "table": embeddings.for_encoder(
        enc_dir, records.default_pattern(tiny_world, "catalog"),
        records.default_pattern(tiny_world, "queries"))}
    for name in ("debias", "cluster"):
        out[name] = (os.path.join(root, name), ctr_task.load_trained(os.path.join(root, name)))
    return out


@pytest.fixture(scope="session")
def exports(trained, tmp_path_factory) -> dict:
    """The exports of `trained`'s models (encoder, debias, cluster), made once for the run."""
    import sys

    from export import ctr as export_ctr
    from export_helpers import run_ok
    from trainer.features import versions

    def build(root: str) -> None:
        run_ok([sys.executable, "-m", "export.encoder", f"--model_dir={trained['encoder']}",
                f"--export_dir={os.path.join(root, 'encoder')}"])
        for name in ("debias", "cluster"):
            export_ctr.export(trained[name][0], os.path.join(root, name))

    root = shared_dir(tmp_path_factory, "exports", {"trained": trained["encoder"]}, build)
    return {"root": root, **{name: versions.latest_version_dir(os.path.join(root, name))
                             for name in ("encoder", "debias", "cluster")}}
