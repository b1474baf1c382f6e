"""Shared fixtures: a tiny synthetic world per test session, and helpers to read records."""
from __future__ import annotations

import os

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import numpy as np
import pytest
import tensorflow as tf

# Two logical CPU devices, so distribution tests can run MirroredStrategy on one machine. This must
# happen before TensorFlow initialises its devices, i.e. at import of the test session.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

from trainer.data import pipeline, records  # noqa: E402
from trainer.synth import config, marketplace  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def mirrored() -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy over the 2 logical CPUs for the whole session: a second instance in
    the same process reuses collective instance keys and trips over the first one's shapes."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> str:
    """The `tiny` world, seed 0, compact layout (images joined from the catalog)."""
    d = str(tmp_path_factory.mktemp("tiny"))
    marketplace.generate(config.get_world("tiny"), d, seed=0)
    return d


@pytest.fixture(scope="session")
def encoder_dir(tiny_world, tmp_path_factory) -> str:
    """A (briefly) trained S1 encoder model dir on the tiny world, as the CTR stages take it."""
    from trainer import configs
    from trainer.models import pretrain
    from trainer.train import loop
    enc = configs.EncoderConfig(depth=10, width_multiplier=0.5, image_size=32, feature_dim=32)
    model_dir = str(tmp_path_factory.mktemp("enc"))
    train = configs.TrainConfig(steps=3, global_batch_size=16, log_interval=3, warmup_steps=0)
    task = pretrain.PretrainTask(
        configs.PretrainConfig(catalog_pattern=records.default_pattern(tiny_world, "catalog")),
        enc, train)
    loop.run(task, train, model_dir)
    configs.save(model_dir, configs.PretrainStage(model_dir=model_dir, encoder=enc, train=train))
    return model_dir


def read_all(data_dir: str, kind, split: str = "*", image_size: int = 32, **overrides) -> dict:
    """Every record of one kind (a name, or a `RecordKind` such as a feature spec's `ctr`), in
    file order, as numpy arrays (one pass, no shuffling)."""
    name = kind if isinstance(kind, str) else kind.name
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
