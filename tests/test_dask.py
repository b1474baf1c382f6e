"""The Beam pipelines on a real multi-process engine: a dask.distributed cluster of 2 worker
processes on 127.0.0.1 (`trainer.pipelines.dask_runner`). Each pipeline's outputs (convert, vocab,
join, embed, evaluate) equal the in-process runner's (records as sets, vocabularies and tables
exactly, dead letters, counters, metrics); a worker killed during the embed job is replaced and
the job completes with the whole table."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dask import distributed
from test_evaluate import assert_matches_in_process
from test_pipelines import _assert_vocabularies_equal

from conftest import REPO, raw_records, read_all, with_bad_value, write_records
from trainer import configs, registry
from trainer.ctr import spec as ctr_spec
from trainer.data import records, validate
from trainer.features import catalog_embed
from trainer.features import clusters as clusters_lib
from trainer.features import embeddings as embeddings_lib
from trainer.pipelines import convert as convert_pipeline
from trainer.pipelines import dask_runner
from trainer.pipelines import join as join_pipeline
from trainer.pipelines import vocab as vocab_pipeline

sys.path.insert(0, os.path.join(REPO, "scripts"))
from test_convert_parquet import catalog_table  # noqa: E402

# Dask clusters of worker processes: `make test-e2e`.
pytestmark = pytest.mark.e2e

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture(scope="module")
def dask_args():
    """Beam options for a local cluster of 2 worker processes, started once for the module."""
    cluster = dask_runner.local_cluster(2)
    with distributed.Client(cluster) as client:
        pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    yield ["--runner=dask", f"--dask_client_address={cluster.scheduler_address}"]
    cluster.close()


def _records(paths) -> list[bytes]:
    return sorted(r for p in paths for r in raw_records(p))


def test_convert_on_dask_equals_in_process_with_its_dead_letters(tiny_world, tmp_path,
                                                                 dask_args):
    """The catalog with a missing image, a broken rule and a file of the wrong type: the same
    records, dead letters and counters from both runners."""
    cat, table, img_dir = catalog_table(tiny_world, tmp_path)
    ids = table.column("item_id").to_pylist()
    os.remove(img_dir / f"{ids[3]}.jpg")
    price = table.column("price").to_pylist()
    price[5] = -2.5
    table = table.set_column(table.schema.get_field_index("price"), "price",
                             pa.array(price, pa.float32()))
    for i, part in enumerate((table.slice(0, 150), table.slice(150))):
        pq.write_table(part, str(tmp_path / f"items-{i}.parquet"), row_group_size=64)
    bad_type = table.slice(0, 2).set_column(
        table.schema.get_field_index("brand_id"), "brand_id", pa.array(["x", "y"]))
    pq.write_table(bad_type, str(tmp_path / "items_text.parquet"))
    pattern = f"{tmp_path / 'items-*.parquet'},{tmp_path / 'items_text.parquet'}"
    out = {}
    for name, args in (("direct", []), ("dask", dask_args)):
        out[name] = convert_pipeline.convert("catalog", pattern, str(tmp_path / name), "all", 2,
                                             image_dir=str(img_dir), beam_args=args)
    got, want = out["dask"], out["direct"]
    assert _records(got["paths"]) == _records(want["paths"])
    assert len(_records(got["paths"])) == len(cat) - 2
    assert [os.path.basename(p) for p in got["paths"]] == [
        os.path.basename(p) for p in want["paths"]]

    def letters(o):
        return sorted(json.dumps(d, sort_keys=True)
                      for d in convert_pipeline.read_dead_letters(o["dead_letter"]))
    assert letters(got) == letters(want) and len(letters(got)) == 4
    assert got["counters"] == want["counters"]
    assert got["counters"]["dead_letter_conversion"] == 3


def test_vocab_on_dask_equals_in_process_and_the_command_starts_its_own_cluster(
        tiny_world, tmp_path, dask_args):
    """The vocabularies from the shared cluster equal the in-process ones exactly; the command
    with `--runner=dask --dask_workers=2` starts a local cluster of its own and writes the same
    file."""
    pattern = records.default_pattern(tiny_world, "ctr", "train")
    spec = ctr_spec.load("synthetic")
    want = vocab_pipeline.run(pattern, spec, str(tmp_path / "direct.npz"))
    got = vocab_pipeline.run(pattern, spec, str(tmp_path / "dask.npz"), beam_args=dask_args)
    _assert_vocabularies_equal(got, want)
    out = subprocess.run([sys.executable, "-m", "trainer.pipelines.vocab",
                          f"--records={pattern}", "--output=" + str(tmp_path / "cmd.npz"),
                          "--runner=dask", "--dask_workers=2"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "vocab: done in" in out.stdout and "records read=" in out.stdout, out.stdout
    _assert_vocabularies_equal(vocab_pipeline.tables.Vocabularies.load(str(tmp_path / "cmd.npz")),
                               want)


def test_join_on_dask_equals_in_process_both_ways(tiny_world, tmp_path, dask_args):
    """The shuffle join (CoGroupByKey) and the side-input join, Cluster-ID and Vector: the same
    joined records from both runners."""
    spec = ctr_spec.load("synthetic")
    recs = raw_records(records.default_pattern(tiny_world, "ctr", "test"))[:300]
    pattern = ",".join(write_records(str(tmp_path / "ctr" / f"in-0000{i}-of-00002.tfrecord"),
                                     recs[i::2]) for i in range(2))
    rng = np.random.default_rng(0)
    cat = read_all(tiny_world, "catalog", decode_images=False)
    queries = read_all(tiny_world, "queries", decode_images=False)

    def unit(n):
        v = rng.normal(size=[n, 8]).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    images = embeddings_lib.EmbeddingTable(
        cat["item_id"][5:], cat["category_id"][5:], cat["impressions_30d"][5:],
        unit(len(cat["item_id"]) - 5), queries["query_id"], unit(len(queries["query_id"])))
    table_path = str(tmp_path / "embeddings.npz")
    embeddings_lib.save(images, table_path)
    clusters_lib.Clusters(unit(6)).save(str(tmp_path / "clusters.npz"))
    for mode, in_memory in (("cluster_id", False), ("vector", True)):
        out = {}
        for name, args in (("direct", []), ("dask", dask_args)):
            out[name] = join_pipeline.run(
                pattern, spec, mode, table_path, str(tmp_path / f"{mode}-{name}"), "train",
                query_embeddings=table_path, centroids=str(tmp_path / "clusters.npz"),
                table_in_memory=in_memory, beam_args=args)
        assert _records(out["dask"]["paths"]) == _records(out["direct"]["paths"])
        assert len(_records(out["dask"]["paths"])) == len(recs)
        assert out["dask"]["counters"] == out["direct"]["counters"]


def test_a_bad_record_fails_the_dask_job_naming_it(tiny_world, tmp_path, dask_args):
    """A record that breaks a rule, read by a worker process: the job fails on the launching side
    with the error that names its file, index and feature."""
    path = with_bad_value(records.default_pattern(tiny_world, "ctr", "test"),
                          str(tmp_path / "ctr" / "bad-00000-of-00001.tfrecord"), "price", -1.0)
    with pytest.raises(validate.BadRecordError,
                       match=rf"{path}: record 7: feature 'price': must be >= 0"):
        vocab_pipeline.run(path, ctr_spec.load("synthetic"), str(tmp_path / "vocab.npz"),
                           beam_args=dask_args)
    assert not os.path.exists(tmp_path / "vocab.npz")


def _embed_stage(tiny_world, export_dir, centroids, out_dir, beam_options=""):
    return configs.EmbedStage(data_dir=tiny_world, model_dir=out_dir, embed=configs.
                              CatalogEmbedConfig(encoder_export=export_dir, centroids=centroids,
                                                 batch_size=64, beam_options=beam_options))


def _table(out_dir) -> dict:
    return dict(np.load(os.path.join(out_dir, "embeddings.npz")))


def test_embed_stage_on_dask_equals_in_process(trained, exports, tiny_world, tmp_path,
                                               dask_args):
    """`--stage=embed` with `embed.beam_options` naming the cluster: the same table (ids,
    embeddings, cluster ids) and counters as in process."""
    centroids = os.path.join(trained["cluster"][0], "clusters.npz")
    export_dir = os.path.dirname(exports["encoder"])
    manifests = {}
    for name, options in (("direct", ""), ("dask", " ".join(dask_args))):
        out_dir = str(tmp_path / name)
        registry.run(_embed_stage(tiny_world, export_dir, centroids, out_dir, options))
        manifests[name] = catalog_embed.load_manifest(out_dir)
    got, want = _table(tmp_path / "dask"), _table(tmp_path / "direct")
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert manifests["dask"]["counters"] == manifests["direct"]["counters"]
    assert manifests["dask"]["items"] == len(trained["table"].item_id)


def test_evaluate_on_dask_equals_in_process(trained, exports, tiny_world, tmp_path, dask_args):
    """The evaluate job through `--stage=evaluate` with `evaluate.beam_options` naming the
    cluster: the in-process evaluation's metrics and rows (`assert_matches_in_process`), each
    page once."""
    out_dir = str(tmp_path / "dask")
    registry.run(configs.EvaluateStage(
        data_dir=tiny_world, model_dir=out_dir, evaluate=configs.EvaluateConfig(
            model_export=exports["cluster"], batch_size=256, beam_options=" ".join(dask_args))))
    assert_matches_in_process(out_dir, trained["cluster"][0])
    pages = pq.read_table(os.path.join(out_dir, "pages")).column("group").to_pylist()
    assert len(pages) == len(set(pages))


# A second local cluster's scheduler serves its HTTP endpoints (health, metrics) on another port.
@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")
def test_a_worker_killed_during_embed_is_replaced_and_the_table_is_whole(
        trained, exports, tiny_world, tmp_path):
    """SIGKILL to a worker process while it runs a bundle of the embed job: the nanny starts a
    new worker, the scheduler runs the lost bundles again, the job completes, and the table is
    the in-process table: every item once, no partial file left beside the shards."""
    centroids = os.path.join(trained["cluster"][0], "clusters.npz")
    export_dir = os.path.dirname(exports["encoder"])
    registry.run(_embed_stage(tiny_world, export_dir, centroids, str(tmp_path / "direct")))
    cluster = dask_runner.local_cluster(2)
    client = distributed.Client(cluster)
    try:
        pids = client.run(os.getpid)
        options = f"--runner=dask --dask_client_address={cluster.scheduler_address}"
        errors: list = []

        def job():
            try:
                registry.run(_embed_stage(tiny_world, export_dir, centroids,
                                          str(tmp_path / "dask"), options))
            except BaseException as e:  # noqa: BLE001  (re-raised by the test below)
                errors.append(e)

        thread = threading.Thread(target=job)
        thread.start()
        killed = None
        deadline = time.time() + 300
        while killed is None and thread.is_alive() and time.time() < deadline:
            busy = {w: tasks for w, tasks in client.processing().items()
                    if any("_run_bundle" in str(t) for t in tasks)}
            if busy:
                worker = sorted(busy)[0]
                killed = pids[worker]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
        thread.join(600)
        assert killed is not None, "the job ended before a worker was seen running a bundle"
        assert not errors, errors
        assert killed not in client.run(os.getpid).values()  # replaced by a new process
    finally:
        client.close()
        cluster.close()
    got, want = _table(tmp_path / "dask"), _table(tmp_path / "direct")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    table_dir = tmp_path / "dask" / "table"
    assert sorted(os.listdir(table_dir)) == sorted(
        os.path.basename(p) for p in glob.glob(str(table_dir / "embeddings-*.tfrecord")))
