"""The CTR model with D under `tf.distribute.ParameterServerStrategy` on an in-process cluster (2
workers and 2 parameter servers as `tf.distribute.Server`s of this process, as in TensorFlow's
parameter-server tutorial): trains, resumes, and applies one step that is compared with one
device's. Run by tests/test_parameter_server.py in a process of its own, because connecting to a
cluster changes the process's eager context for good; prints one JSON line of results."""
from __future__ import annotations

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import argparse
import dataclasses
import json

import numpy as np
import tensorflow as tf
import tf_keras

from trainer import configs
from trainer.ctr import debias
from trainer.ctr import spec as ctr_spec
from trainer.ctr import task as ctr_task
from trainer.data import records
from trainer.features import embeddings
from trainer.train import loop


def in_process_cluster(workers: int, servers: int
                       ) -> tf.distribute.cluster_resolver.SimpleClusterResolver:
    ports = loop.local_ports(workers + servers)
    spec = tf.train.ClusterSpec({
        "worker": [f"127.0.0.1:{p}" for p in ports[:workers]],
        "ps": [f"127.0.0.1:{p}" for p in ports[workers:]]})
    # The servers share this process's inter-op threads: with fewer than one per task (2 cores
    # give 2), a worker's step that waits on a parameter server can starve it (TensorFlow's
    # parameter-server tutorial sets the same).
    config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=workers + servers + 2)
    for job, n in (("worker", workers), ("ps", servers)):
        for i in range(n):
            tf.distribute.Server(spec, job_name=job, task_index=i, protocol="grpc",
                                 config=config, start=True)
    return tf.distribute.cluster_resolver.SimpleClusterResolver(spec, rpc_layer="grpc")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", required=True)
    parser.add_argument("--encoder_dir", required=True)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()

    # Shards of at least 1 KiB: the tiny world's tables split over both servers.
    strategy = loop.parameter_server_strategy(in_process_cluster(2, 2), shard_bytes=1024)
    spec = ctr_spec.load("synthetic")
    table = embeddings.for_encoder(args.encoder_dir,
                                   records.default_pattern(args.world, "catalog"),
                                   records.default_pattern(args.world, "queries"))
    cfg = configs.CtrConfig(
        train_pattern=records.default_pattern(args.world, "ctr", "train"),
        test_pattern=records.default_pattern(args.world, "ctr", "test"),
        tower_units=(64, 32), debias=configs.DebiasConfig())
    positives = debias.mine_positives(table.item_vector, table.category_id,
                                      table.impressions_30d < 5)
    train = configs.TrainConfig(steps=args.steps, global_batch_size=128, learning_rate=2e-3,
                                warmup_steps=0, lr_schedule="constant", log_interval=25,
                                checkpoint_interval=50)
    out: dict = {}
    # What the debias stage records (the export rebuilds the model from it).
    configs.save(args.model_dir, configs.DebiasStage(
        model_dir=args.model_dir, data_dir=args.world, train=train, ctr=cfg,
        images=configs.ImageSourceConfig(encoder="s1", model_dir=args.encoder_dir,
                                         s1_model_dir=args.encoder_dir)))
    out["first"] = ctr_task.train_and_evaluate(
        cfg, spec, train, args.model_dir, table.item_id, table.impressions_30d, table,
        positives, strategy=strategy)
    out["resumed"] = ctr_task.train_and_evaluate(
        cfg, spec, dataclasses.replace(train, steps=args.steps + 50), args.model_dir,
        table.item_id, table.impressions_30d, table, positives, strategy=strategy)
    vocabularies = ctr_task.vocabularies_for(args.model_dir, cfg, spec)
    with strategy.scope():
        model = ctr_task.CtrTask(cfg, spec, vocabularies, train, table, positives).build_model()
    out["sharded"] = sorted({v.name.split("/part_")[0] for v in model.variables
                             if "/part_1" in v.name})

    # One step, synchronous (scheduled and waited for), against one device from the same
    # weights. K = 1: D's positive draw is deterministic, so both see the same positives.
    one = dataclasses.replace(cfg, debias=configs.DebiasConfig(num_similar=1))
    positives_1 = debias.mine_positives(table.item_vector, table.category_id,
                                        table.impressions_30d < 5, 1)
    sgd = configs.TrainConfig(steps=10, global_batch_size=16, optimizer="sgd",
                              learning_rate=0.5, warmup_steps=0, deterministic=True)

    def make() -> ctr_task.CtrTask:
        return ctr_task.CtrTask(one, spec, vocabularies, sgd, table, positives_1)

    tf_keras.utils.set_random_seed(0)
    task = make()
    batch = {k: v.numpy() for k, v in next(iter(task.build_inputs(None))).items()}
    model = task.build_model()
    start = [v.numpy() for v in loop.trainable_variables(task, model)
             + model.non_trainable_variables]
    loss_1, after_1 = loop.one_step(make(), sgd, tf.distribute.OneDeviceStrategy("/cpu:0"),
                                    batch, start)
    loss_ps, after_ps = loop.one_step(make(), sgd, strategy, batch, start)
    out["one_step"] = {
        "loss_one_device": loss_1, "loss_parameter_server": loss_ps,
        "largest_weight_difference": max(float(np.abs(a - b).max())
                                         for a, b in zip(after_1, after_ps, strict=True)),
        "weights_changed": sum(int(not np.allclose(a, s))
                               for a, s in zip(after_1, start, strict=True))}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
