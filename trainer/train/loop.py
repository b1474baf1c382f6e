"""The training loop every stage shares: a strategy, tf-models-official's optimizer factory, and an
Orbit controller that restores the latest checkpoint, trains to `steps`, checkpoints, writes
TensorBoard scalars and prints progress.

A stage is a `Task` (in the manner of tf-models-official's tasks): it builds its model and its
per-replica input, and computes its loss in replica context as its share of the global mean (see
`trainer.models.contrastive`). The loop owns the rest.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import math
import os
import re
import socket
import sys
import time

import numpy as np
import orbit
import tensorflow as tf
import tf_keras
from official.modeling.optimization import optimizer_factory
from official.modeling.optimization.configs import optimization_config
from tensorflow.core.util import event_pb2

from trainer import configs, console, tracing
from trainer.configs import TrainConfig
from trainer.data import pipeline

log = logging.getLogger(__name__)
STRATEGIES = ("one_device", "mirrored", "multi_worker_mirrored", "parameter_server")


def make_strategy(name: str, shard_bytes: int = TrainConfig.shard_bytes
                  ) -> tf.distribute.Strategy:
    """A strategy by name. Without GPUs, `mirrored` mirrors over the logical CPU devices;
    `parameter_server` takes its cluster from TF_CONFIG (`parameter_server_strategy`)."""
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "parameter_server":
        return parameter_server_strategy(
            tf.distribute.cluster_resolver.TFConfigClusterResolver(), shard_bytes)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got '{name}'")


def parameter_server_strategy(resolver: tf.distribute.cluster_resolver.ClusterResolver,
                              shard_bytes: int = TrainConfig.shard_bytes
                              ) -> tf.distribute.ParameterServerStrategy:
    """`tf.distribute.ParameterServerStrategy` over `resolver`'s cluster (a chief, workers and
    parameter servers): every variable of at least `shard_bytes` is split into row shards over
    the parameter servers, so id embeddings and image tables are bounded by the servers' memory
    together, not by one machine's."""
    servers = resolver.cluster_spec().as_dict().get("ps", [])
    if not servers or not resolver.cluster_spec().as_dict().get("worker"):
        raise ValueError("the parameter_server strategy needs 'worker' and 'ps' tasks in its "
                         f"cluster (TF_CONFIG), got {resolver.cluster_spec().as_dict()}")
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=shard_bytes, max_shards=len(servers))
    return tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)


def serve_if_not_coordinator(strategy_name: str) -> None:
    """Under the parameter-server strategy, a worker or parameter-server process of TF_CONFIG's
    cluster only serves the chief's (the coordinator's) requests: this starts its server and
    never returns (the cluster's manager stops it when the chief is done)."""
    if strategy_name != "parameter_server":
        return
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if resolver.task_type not in ("worker", "ps"):
        return
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type,
                                  task_index=resolver.task_id, protocol="grpc", start=True)
    print(f"{resolver.task_type} {resolver.task_id}: serving {server.target}",
          file=sys.stderr, flush=True)
    server.join()


def local_ports(n: int) -> list[int]:
    """n TCP ports free on 127.0.0.1 now: for a cluster of local processes or servers."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def is_parameter_server(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.ParameterServerStrategy)


def build_optimizer(cfg: TrainConfig) -> tf_keras.optimizers.Optimizer:
    """tf-models-official optimizer with linear warmup, then cosine decay to zero or constant."""
    opt_params = {"adam": {}, "adagrad": {}, "sgd": {"momentum": cfg.momentum},
                  "adamw": {"weight_decay_rate": cfg.weight_decay},
                  "lars": {"momentum": cfg.momentum, "weight_decay_rate": cfg.weight_decay}}
    if cfg.optimizer not in opt_params:
        raise ValueError(f"optimizer must be one of {sorted(opt_params)}, got '{cfg.optimizer}'")
    schedules = {"cosine": {"initial_learning_rate": cfg.learning_rate,
                            "decay_steps": max(cfg.steps, 1)},
                 "constant": {"learning_rate": cfg.learning_rate}}
    if cfg.lr_schedule not in schedules:
        raise ValueError(f"lr_schedule must be one of {sorted(schedules)}, got '{cfg.lr_schedule}'")
    params = {
        "optimizer": {"type": cfg.optimizer, cfg.optimizer: opt_params[cfg.optimizer]},
        "learning_rate": {"type": cfg.lr_schedule, cfg.lr_schedule: schedules[cfg.lr_schedule]},
    }
    warmup = min(cfg.warmup_steps, cfg.steps // 5)  # a short run still gets its decay
    if warmup:
        params["warmup"] = {"type": "linear", "linear": {"warmup_steps": warmup}}
    factory = optimizer_factory.OptimizerFactory(optimization_config.OptimizationConfig(params))
    optimizer = factory.build_optimizer(factory.build_learning_rate())
    if tf_keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


class Task(abc.ABC):
    """One stage's model, input and loss. Subclasses set `name`, usually `pipe`, and implement
    the abstract methods; `build_model` runs in the strategy's scope."""

    name: str = "task"
    metric_names: tuple = ()  # metrics compute_loss returns besides the loss
    input_seed: int = 0  # set by the loop: seed of input order and augmentation
    # Set by the parameter-server loop while a worker builds its input: (workers, this worker's
    # index as a tensor), so that each reads its own part of the records.
    worker_shard: tuple | None = None
    start_step: int = 0  # set by the loop: steps a deterministic resumed run skips
    pipe: pipeline.InputPipeline | None = None  # the training input

    @abc.abstractmethod
    def build_model(self) -> tf_keras.Model:
        """The model whose weights are trained; checkpointed as `model`."""

    def extra_checkpoint_objects(self) -> dict:
        """Other trackables to checkpoint (e.g. a classification head)."""
        return {}

    @abc.abstractmethod
    def build_inputs(self, input_context: tf.distribute.InputContext | None = None
                     ) -> tf.data.Dataset:
        """This replica's batches."""

    @abc.abstractmethod
    def compute_loss(self, batch: dict, training: bool = True) -> tuple[tf.Tensor, dict]:
        """(this replica's share of the global loss, {metric name: this replica's share})."""

    def after_update(self) -> None:
        """Runs in replica context after each optimizer update (e.g. a moving-average teacher's
        update, `moving_average`); nothing by default."""
        return None

    def errors_named(self):
        """Context manager that names the input's bad records."""
        return self.pipe.errors_named() if self.pipe else contextlib.nullcontext()

    def seeded_dataset(self, input_context: tf.distribute.InputContext | None = None
                       ) -> tf.data.Dataset:
        """`pipe`'s dataset with shuffles and augmentation seeded by `input_seed`, past the
        batches of `start_step` steps in deterministic mode."""
        assert self.pipe is not None
        self.pipe.cfg = dataclasses.replace(self.pipe.cfg, seed=self.input_seed,
                                            start_step=self.start_step)
        return self.pipe.dataset(input_context, self.worker_shard)


def trainable_variables(task: Task, model: tf_keras.Model) -> list:
    return model.trainable_variables + [
        v for obj in task.extra_checkpoint_objects().values()
        for v in getattr(obj, "trainable_variables", [])]


NON_FINITE = "non-finite training loss"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; nothing after the last good step was saved."""


def train_step(task: Task, model: tf_keras.Model, optimizer, batch: dict) -> tuple:
    """One optimizer step in replica context: (this replica's loss share, metric shares)."""
    variables = trainable_variables(task, model)
    scaling = isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
    with tf.GradientTape() as tape:
        loss, metrics = task.compute_loss(batch, training=True)
        # Before any update: a non-finite loss stops the run with the weights of the last step
        # (and the last checkpoint) still finite (`NonFiniteLossError`).
        loss = tf.debugging.check_numerics(loss, NON_FINITE)
        scaled = optimizer.get_scaled_loss(loss) if scaling else loss
    grads = tape.gradient(scaled, variables)
    if scaling:
        grads = optimizer.get_unscaled_gradients(grads)
    optimizer.apply_gradients(zip(grads, variables, strict=True))
    task.after_update()
    return loss, metrics


def moving_average(targets: list, sources: list, momentum: float) -> None:
    """targets <- momentum * targets + (1 - momentum) * sources, from replica context: once per
    variable under a strategy (a merge call, as an optimizer's update), each device's copy
    updated from its own copy of the source."""
    def update(strategy):
        for t, s in zip(targets, sources, strict=True):
            strategy.extended.update(
                t, lambda t_, s_: t_.assign(momentum * t_ + (1.0 - momentum) * s_), args=(s,))

    tf.distribute.get_replica_context().merge_call(update)


def one_step(task: Task, cfg: TrainConfig, strategy: tf.distribute.Strategy, batch: dict,
             weights: list | None = None) -> tuple[float, list]:
    """Builds the task's model under `strategy` (optionally with `weights`), applies one step to
    the global `batch` (split across replicas in order) and returns (global loss, new weights):
    the check that a strategy computes the same step as one device. Under the parameter-server
    strategy one worker applies the step (one step scheduled and waited for: a synchronous
    update), and the weights are the logical ones, a sharded variable's shards joined."""
    with strategy.scope():
        model = task.build_model()
        optimizer = build_optimizer(cfg)
    variables = logical_variables(trainable_variables(task, model)
                                  + model.non_trainable_variables)
    if weights is not None:
        for parts, w in zip(variables, weights, strict=True):
            bounds = np.cumsum([0] + [int(v.shape[0]) for v in parts]) if len(parts) > 1 else None
            for i, v in enumerate(parts):
                v.assign(w if bounds is None else w[bounds[i]:bounds[i + 1]])
    if is_parameter_server(strategy):
        coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)

        @tracing.function
        def scheduled():
            return strategy.run(lambda x: train_step(task, model, optimizer, x)[0],
                                args=(batch,))

        loss = float(coordinator.schedule(scheduled).fetch())
    else:
        dist = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch))

        @tracing.function
        def step(b):
            loss, _ = strategy.run(lambda x: train_step(task, model, optimizer, x), args=(b,))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)

        loss = float(step(next(iter(dist))))
    new = [parts[0].numpy() if len(parts) == 1 else np.concatenate([v.numpy() for v in parts])
           for parts in variables]
    return loss, new


def logical_variables(variables: list) -> list[list]:
    """`variables` grouped into logical ones: a variable sharded over parameter servers is listed
    as its shards (`.../part_<i>`), which join along the first axis."""
    groups: list[list] = []
    for v in variables:  # shards are listed in order, part_0 first (names may repeat)
        part = re.search(r"/part_(\d+)(:\d+)?$", v.name)
        if part and int(part.group(1)) > 0 and groups:
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups


class _Trainer(orbit.StandardTrainer):
    def __init__(self, task: Task, strategy, model, optimizer, dataset, global_step,
                 log_interval: int = 1):
        self.task, self.strategy, self.model, self.optimizer = task, strategy, model, optimizer
        self.global_step, self.log_interval = global_step, log_interval
        with strategy.scope():
            self.metrics = {n: tf_keras.metrics.Mean(n) for n in ("loss",) + task.metric_names}
        super().__init__(dataset, options=orbit.StandardTrainerOptions(use_tf_function=True))

    def train_loop_begin(self):
        if int(self.global_step.numpy()) % self.log_interval == 0:  # means over a log interval
            for m in self.metrics.values():
                m.reset_state()

    @tracing.plain  # Orbit's loop is AutoGraph's (a loop over tf.range); the step is not
    def train_step(self, iterator):
        self.strategy.run(self.replica_step, args=(next(iterator),))

    def replica_step(self, batch):
        loss, metrics = train_step(self.task, self.model, self.optimizer, batch)
        with tf.control_dependencies([loss]):  # counts only steps whose loss was finite
            self.global_step.assign_add(1)
        # Metric means over replicas of R * share = the global value.
        r = self.strategy.num_replicas_in_sync
        for name, value in {"loss": loss, **metrics}.items():
            self.metrics[name].update_state(value * r)
        return loss

    def train_loop_end(self):
        out = {k: m.result() for k, m in self.metrics.items()}
        lr = self.optimizer.learning_rate
        out["learning_rate"] = lr(self.global_step) if callable(lr) else lr
        return out


def logged_scalars(log_dir: str, tag: str) -> dict[int, float]:
    """{step: value} of a scalar the loop wrote to TensorBoard in `log_dir` (e.g. MODEL_DIR/train);
    a step logged again by a resumed run keeps its latest value."""
    out = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            event = event_pb2.Event.FromString(raw)
            for v in event.summary.value:
                if v.tag == tag:
                    out[event.step] = float(tf.make_ndarray(v.tensor))
    return dict(sorted(out.items()))


def restored_step(model_dir: str) -> int:
    """The global step of `model_dir`'s latest checkpoint (0 without one)."""
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt"))
    if not latest:
        return 0
    return int(tf.train.load_variable(latest, "global_step/.ATTRIBUTES/VARIABLE_VALUE"))


def run(task: Task, cfg: TrainConfig, model_dir: str,
        strategy: tf.distribute.Strategy | None = None, seed: int = 0) -> dict:
    """Trains `task` to `cfg.steps` in `model_dir`, resuming from its latest checkpoint; `seed`
    seeds the initialisation, the input order and augmentation.

    Writes ckpt/ (checkpoints) and train/ (TensorBoard) and prints progress (the stage writes
    config.json). Returns the last logged metrics.
    """
    configs.check(cfg, "train")
    strategy = strategy or make_strategy(cfg.strategy)
    replicas = strategy.num_replicas_in_sync
    per_replica = cfg.replica_batch_size(replicas)
    tf_keras.utils.set_random_seed(seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    chief = is_chief(strategy)
    # Every worker of a multi-worker job saves (saving is a collective); only the chief's files
    # are kept, the others write to a scratch dir.
    out_dir = model_dir if chief else os.path.join(
        model_dir, "workers", f"{strategy.cluster_resolver.task_type}"
        f"{strategy.cluster_resolver.task_id}")
    start = restored_step(model_dir)
    if start >= cfg.steps:
        print(f"{task.name}: {model_dir} is already trained to step {start} (steps={cfg.steps})")
        return {}
    if cfg.deterministic:  # the same stream as an uninterrupted run, from where it stopped
        task.input_seed, task.start_step = seed, start
    else:  # read on with fresh shuffles instead of replaying the first batches
        task.input_seed, task.start_step = seed + 7919 * start, 0
    if is_parameter_server(strategy):
        return _run_coordinated(task, cfg, model_dir, strategy, start)
    if not chief and tf.io.gfile.exists(out_dir):
        tf.io.gfile.rmtree(out_dir)  # a stale scratch checkpoint must not shadow the chief's
    with strategy.scope():
        model = task.build_model()
        optimizer = build_optimizer(cfg)
        global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    dataset = strategy.distribute_datasets_from_function(task.build_inputs)
    trainer = _Trainer(task, strategy, model, optimizer, dataset, global_step, cfg.log_interval)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, global_step=global_step,
                               **task.extra_checkpoint_objects())
    # Non-chief workers restore from the chief's checkpoints (shared storage), save to scratch.
    manager = tf.train.CheckpointManager(
        ckpt, os.path.join(out_dir, "ckpt"), max_to_keep=3, step_counter=global_step,
        checkpoint_interval=cfg.checkpoint_interval)
    if not chief:
        latest = tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt"))
        if latest:
            ckpt.restore(latest)
    progress = _Progress(task.name, cfg, start, global_step, per_replica, replicas)
    # Orbit saves and logs between loops: loops of gcd(log, checkpoint interval) steps let it do
    # both at their own intervals (a checkpoint interval of 10 with logs every 50 stays 10).
    with console.library_prints("orbit"):  # "restoring or initializing model..."
        controller = orbit.Controller(
            strategy=strategy, trainer=trainer, global_step=global_step,
            steps_per_loop=math.gcd(cfg.log_interval, cfg.checkpoint_interval),
            checkpoint_manager=manager,
            summary_dir=os.path.join(out_dir, "train"), summary_interval=cfg.log_interval,
            train_actions=[progress])
    if start:
        print(f"{task.name}: resumed from step {start} ({manager.latest_checkpoint})")
    with _stops_on_non_finite_loss(task, model_dir, global_step, manager):
        _train(task, cfg, controller, out_dir, start)
    return {k: float(v) for k, v in progress.last.items()}


@contextlib.contextmanager
def _stops_on_non_finite_loss(task: Task, model_dir: str, global_step: tf.Variable,
                              manager: tf.train.CheckpointManager):
    try:
        yield
    except tf.errors.InvalidArgumentError as e:
        if NON_FINITE not in (e.message or ""):
            raise
        step = int(global_step.numpy())
        raise NonFiniteLossError(
            f"{task.name}: the training loss is not finite (NaN or infinite) at step {step + 1} "
            f"of {model_dir}; training stopped before updating the weights with it. The last "
            f"checkpoint, {manager.latest_checkpoint or 'none yet'}, holds finite weights. Lower "
            "train.learning_rate (or check the input) and run again to resume from it.") from None


def _run_coordinated(task: Task, cfg: TrainConfig, model_dir: str,
                     strategy: tf.distribute.ParameterServerStrategy, start: int) -> dict:
    """The parameter-server loop: this process (the chief) coordinates. Variables live on the
    parameter servers (sharded by the strategy's partitioner); each worker reads its own part of
    the records (`Task.worker_shard`) and runs steps the `ClusterCoordinator` schedules, applying
    its updates asynchronously. Between loops of gcd(log, checkpoint interval) steps the chief
    waits for the scheduled steps, logs and checkpoints, as the Orbit loop does."""
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
        model = task.build_model()
        optimizer = build_optimizer(cfg)
        global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        metrics = {n: tf_keras.metrics.Mean(n) for n in ("loss",) + task.metric_names}
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, global_step=global_step,
                               **task.extra_checkpoint_objects())
    manager = tf.train.CheckpointManager(ckpt, os.path.join(model_dir, "ckpt"), max_to_keep=3,
                                         step_counter=global_step)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        print(f"{task.name}: resumed from step {start} ({manager.latest_checkpoint})")
    workers = strategy.extended._num_workers  # noqa: SLF001  (its cluster_resolver is None)

    def dataset_fn(input_context):
        index = tf.distribute.coordinator.experimental_get_current_worker_index()
        task.worker_shard = (workers, index)
        try:
            return task.build_inputs(input_context)
        finally:
            task.worker_shard = None

    iterator = iter(coordinator.create_per_worker_dataset(
        lambda: strategy.distribute_datasets_from_function(dataset_fn)))

    @tracing.function
    def step(it):
        def replica_step(batch):
            loss, values = train_step(task, model, optimizer, batch)
            with tf.control_dependencies([loss]):
                global_step.assign_add(1)
            for name, value in {"loss": loss, **values}.items():
                metrics[name].update_state(value)
        strategy.run(replica_step, args=(next(it),))

    progress = _Progress(task.name, cfg, start, global_step, cfg.global_batch_size, 1)
    writer = tf.summary.create_file_writer(os.path.join(model_dir, "train"))
    every = math.gcd(cfg.log_interval, cfg.checkpoint_interval)
    done = start
    with task.errors_named(), _stops_on_non_finite_loss(task, model_dir, global_step, manager):
        while done < cfg.steps:
            if done % cfg.log_interval == 0:
                for m in metrics.values():
                    m.reset_state()
            for _ in range(min(every - done % every, cfg.steps - done)):
                coordinator.schedule(step, args=(iterator,))
            coordinator.join()
            done = int(global_step.numpy())
            out = {k: m.result() for k, m in metrics.items()}
            lr = optimizer.learning_rate
            out["learning_rate"] = lr(global_step) if callable(lr) else lr
            progress(out)
            if done % cfg.log_interval == 0 or done == cfg.steps:
                with writer.as_default(step=done):
                    for k, v in progress.last.items():
                        tf.summary.scalar(k, v)
            if done % cfg.checkpoint_interval == 0 or done == cfg.steps:
                manager.save(checkpoint_number=done)
    return progress.last


def _train(task: Task, cfg: TrainConfig, controller: orbit.Controller, out_dir: str,
           start: int) -> None:
    with task.errors_named():
        for stop, trace in _phases(cfg, start):
            if trace:
                tf.profiler.experimental.start(os.path.join(out_dir, "train"))
            # Orbit prints a line per loop and checkpoint; the project's _Progress says it once.
            with console.library_prints("orbit"):
                controller.train(steps=stop, checkpoint_at_completion=stop == cfg.steps)
            if trace:
                tf.profiler.experimental.stop()
                first = (cfg.profile_steps or (0,))[0]
                print(f"{task.name}: profiler trace of steps {first + 1}-{stop} "
                      f"in {os.path.join(out_dir, 'train')} (tensorboard --logdir {out_dir}, "
                      "Profile tab)", file=sys.stderr, flush=True)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process keeps the job's files: the chief, else worker 0, else the only one."""
    r = getattr(strategy, "cluster_resolver", None)
    if r is None or r.task_type in (None, "chief"):
        return True
    return r.task_type == "worker" and r.task_id == 0 and "chief" not in r.cluster_spec().as_dict()


def _phases(cfg: TrainConfig, start: int) -> list[tuple[int, bool]]:
    """(train up to this step, traced) segments: the profiler traces steps START+1..END."""
    if not cfg.profile_steps:
        return [(cfg.steps, False)]
    first, last = cfg.profile_steps
    if not 0 <= first < last <= cfg.steps:
        raise ValueError(f"profile_steps ({first}, {last}) must satisfy 0 <= START < END <= "
                         f"steps ({cfg.steps})")
    if start > first:
        log.warning("profile_steps %s: the run resumes at step %d, after START; no trace",
                    cfg.profile_steps, start)
        return [(cfg.steps, False)]
    out = [(first, False)] if first > start else []
    out.append((last, True))
    return out + ([(cfg.steps, False)] if last < cfg.steps else [])


class _Progress:
    """Prints step/total, the loss, examples/s and the time left after every loop."""

    def __init__(self, name: str, cfg: TrainConfig, start: int, global_step: tf.Variable,
                 per_replica: int, replicas: int):
        self.name, self.cfg, self.start, self.global_step = name, cfg, start, global_step
        self.t0 = time.time()
        self.last: dict = {}
        print(f"{name}: global batch {cfg.global_batch_size} = {replicas} replicas x "
              f"{per_replica}", file=sys.stderr, flush=True)

    def __call__(self, output: dict) -> None:
        self.last = {k: float(v) for k, v in output.items()}
        done = int(self.global_step.numpy())
        if done % self.cfg.log_interval and done != self.cfg.steps:
            return  # a loop that ended for a checkpoint
        elapsed = time.time() - self.t0
        rate = max(done - self.start, 1) / max(elapsed, 1e-9)
        left = (self.cfg.steps - done) / rate
        metrics = " ".join(f"{k}={v:.4g}" for k, v in self.last.items())
        print(f"{self.name}: step {done}/{self.cfg.steps} {metrics} "
              f"{rate * self.cfg.global_batch_size:.0f} ex/s, {left / 60:.1f} min left",
              file=sys.stderr, flush=True)
