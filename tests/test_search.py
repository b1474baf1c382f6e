"""The visual search export (`export.search`) on the tiny world: `search` gives each judged query
the top k of `eval_search` (and so its HR), the category filter, the daily refresh's new items,
a two-shard merge equal to one search, the `request` signature's pCTR equal to `rank`'s with its
ads ordered by pCTR x bid, the op audit and `saved_model_cli run`."""
from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, shared_dir
from export import client as client_lib
from export import common
from export import search as export_search
from export_helpers import CLI, add_items, ops_of, run_ok
from serving import stand_in_server
from trainer import configs, registry
from trainer.data import jsonfile, npz, pipeline, records
from trainer.eval import visual_search
from trainer.features import embeddings as embeddings_lib

K = 10


@pytest.fixture(scope="module")
def catalog(tiny_world) -> dict:
    return pipeline.read_columns(records.default_pattern(tiny_world, "catalog"), "catalog", (
        "item_id", "image", "category_id", "shop_id", "brand_id", "price", "bid"))


@pytest.fixture(scope="module")
def searches(trained, tiny_world, tmp_path_factory) -> dict:
    """Search exports of the trained encoder (whole, and two shards by category) and the
    combined export of the CTR model with D: version dirs."""
    table = trained["table"]
    cats = np.unique(table.category_id)
    halves = [cats[::2], cats[1::2]]

    def build(root: str) -> None:
        enc = trained["encoder"]
        export_search.export(enc, os.path.join(root, "search"))
        for i, half in enumerate(halves):
            export_search.export(enc, os.path.join(root, f"shard{i}"),
                                 categories=",".join(str(c) for c in half))
        export_search.export(trained["debias"][0], os.path.join(root, "request"))

    root = shared_dir(tmp_path_factory, "searches", {"trained": trained["encoder"]}, build)
    return {"root": root, "halves": halves,
            **{name: os.path.join(root, name, "1")
               for name in ("search", "shard0", "shard1", "request")}}


def search(version_dir: str, images, category, k: int) -> tuple[np.ndarray, np.ndarray]:
    sig = tf.saved_model.load(version_dir).signatures["search"]
    n = len(images)
    out = sig(images=tf.constant(list(images)),
              category=tf.constant(np.broadcast_to(category, [n]), tf.int64),
              k=tf.fill([n], tf.constant(k, tf.int32)))
    return out["item_id"].numpy(), out["similarity"].numpy()


def test_search_gives_each_judged_query_eval_searchs_top_k_and_hr(trained, tiny_world,
                                                                  searches, catalog, tmp_path):
    # eval_search on a copy of the encoder dir (its embedding cache is the export's table).
    enc = str(tmp_path / "s1")
    shutil.copytree(trained["encoder"], enc)
    registry.run(configs.EvalSearchStage(data_dir=tiny_world, model_dir=enc))
    metrics = jsonfile.read(os.path.join(enc, "metrics.json"))
    table = embeddings_lib.load(os.path.join(enc, embeddings_lib.FILE))
    row_of = {int(i): r for r, i in enumerate(table.item_id)}
    query_ids, relevant_ids = visual_search.load_judgments(
        records.default_pattern(tiny_world, "judgments"))
    queries = np.array([row_of[int(q)] for q in query_ids])
    relevant = [np.setdiff1d([row_of[int(i)] for i in r], [q])
                for q, r in zip(queries, relevant_ids, strict=True)]
    k = max(max(configs.SearchEvalConfig().ks), max(len(r) for r in relevant))
    offline = visual_search.nearest_neighbours(table.item_vector, queries, k)

    image_of = dict(zip(catalog["item_id"].tolist(), catalog["image"], strict=True))
    ids, sims = search(searches["search"], [image_of[int(q)] for q in query_ids], -1, k + 1)
    served = np.stack([[row_of[int(i)] for i in row if i != q][:k]
                       for q, row in zip(query_ids, ids, strict=True)])
    # The same items in the same order, but for neighbours whose similarities tie within float32
    # noise (the photo is encoded in the graph, the offline query by Keras: 1e-6 apart; this
    # barely trained encoder puts many items within 1e-5): there two may trade places.
    vectors = table.item_vector
    cos = np.einsum("qd,qkd->qk", vectors[queries], vectors[served])
    want = np.einsum("qd,qkd->qk", vectors[queries], vectors[offline])
    np.testing.assert_allclose(cos, want, atol=1e-5)
    swapped = served != offline
    assert swapped.mean() < 0.01, swapped.mean()
    for q, j in zip(*np.nonzero(swapped), strict=True):
        assert offline[q, j] in served[q] or j == k - 1 or abs(want[q, j] - want[q, -1]) < 1e-5
    assert sims[:, 0] == pytest.approx(1.0, abs=1e-5)  # the query's own image first
    # eval_search's HR is the offline top k's; the served one may differ only where a tied pair
    # traded places across a query's cut-off n_q, one hit per such swap.
    total = sum(len(r) for r in relevant)
    assert visual_search.hit_ratio(offline, relevant) == pytest.approx(metrics["HR"], abs=1e-4)
    assert abs(visual_search.hit_ratio(served, relevant) - metrics["HR"]) \
        <= swapped.sum() / total + 1e-4


def test_the_category_filter_searches_that_category_only(trained, searches, catalog):
    table = trained["table"]
    vectors = table.item_vector / np.linalg.norm(table.item_vector, axis=1, keepdims=True)
    images = list(catalog["image"][:6])
    cats = np.unique(table.category_id)
    row_of = {int(i): r for r, i in enumerate(table.item_id)}
    q = vectors[[row_of[int(i)] for i in catalog["item_id"][:6]]]
    # One category for the batch (the category's slice), and one per row (the masked product).
    mixed = np.array([cats[0], cats[1], -1, cats[0], cats[2], cats[1]], np.int64)
    for category in (np.full(6, cats[0]), mixed):
        ids, sims = search(searches["search"], images, category, K)
        for row, c in enumerate(category):
            allowed = np.flatnonzero((table.category_id == c) | (c < 0))
            scores = q[row] @ vectors[allowed].T
            best = allowed[np.argsort(-scores, kind="stable")[:K]]
            want = table.item_id[best]
            got = ids[row][ids[row] >= 0]
            assert len(got) == min(K, len(allowed))
            if c >= 0:
                assert set(table.category_id[[row_of[int(i)] for i in got]]) == {c}
            np.testing.assert_array_equal(np.sort(got), np.sort(want))
            np.testing.assert_allclose(sims[row][:len(got)], np.sort(scores)[::-1][:len(got)],
                                       atol=1e-5)
    # A category with fewer items than k: the rest is padding.
    small = cats[np.argmin([np.sum(table.category_id == c) for c in cats])]
    size = int(np.sum(table.category_id == small))
    ids, sims = search(searches["search"], images[:1], small, size + 3)
    assert (ids[0, size:] == -1).all() and (sims[0, size:] == 0).all()
    assert (ids[0, :size] >= 0).all()
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"request:1.*category.*-1.*got.*-4"):
        search(searches["search"], images[:2], np.array([0, -4]), K)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"request:0.*k.*max_k = 1000.*got.*1001"):
        search(searches["search"], images[:2], -1, export_search.MAX_K + 1)


def test_the_daily_refresh_adds_new_items_to_the_results(trained, tiny_world, searches,
                                                         tmp_path):
    # Items added after the export: embedded by the embed stage with the encoder's export, and
    # the next version exported from that embedding.
    data = str(tmp_path / "data")
    new_ids, new_images = add_items(tiny_world, data, 4)
    encoder_export = str(tmp_path / "encoder_export")
    run_ok([sys.executable, "-m", "export.encoder", f"--model_dir={trained['encoder']}",
            f"--export_dir={encoder_export}"])
    registry.run(configs.EmbedStage(data_dir=data, model_dir=str(tmp_path / "embedded"),
                                    embed=configs.CatalogEmbedConfig(
                                        encoder_export=encoder_export)))
    embedded = os.path.join(tmp_path, "embedded", "embeddings.npz")
    base = str(tmp_path / "search")
    shutil.copytree(searches["search"], os.path.join(base, "1"))
    export_search.export(trained["encoder"], base, item_embeddings=embedded)
    before, _ = search(os.path.join(base, "1"), new_images, -1, K)
    after, sims = search(os.path.join(base, "2"), new_images, -1, K)
    assert not np.isin(new_ids, before).any()
    np.testing.assert_array_equal(after[:, 0], new_ids)  # each new item finds itself first
    assert sims[:, 0] == pytest.approx(1.0, abs=1e-4)
    assert common.export_info(os.path.join(base, "2"))["items"] == len(
        npz.read(embedded)["item_id"])


def test_two_shards_merged_equal_one_search(searches, catalog):
    servables = stand_in_server.Servables({
        name: os.path.dirname(searches[name]) for name in ("search", "shard0", "shard1")})
    server, port = stand_in_server.start_grpc(servables)
    client = client_lib.GrpcClient(f"127.0.0.1:{port}")
    try:
        shards = {f"shard{i}": common.export_info(searches[f"shard{i}"])["categories"]
                  for i in range(2)}
        assert shards["shard0"] == searches["halves"][0].tolist()
        sharded = client_lib.ShardedSearch(client, shards)
        images = list(catalog["image"][:8])
        whole = client.search(images, -1, K)
        merged = sharded.search(images, -1, K)
        np.testing.assert_array_equal(merged[0], whole[0])
        np.testing.assert_allclose(merged[1], whole[1], atol=1e-6)
        for c in (searches["halves"][0][0], searches["halves"][1][0]):
            np.testing.assert_array_equal(sharded.search(images, int(c), K)[0],
                                          client.search(images, int(c), K)[0])
    finally:
        client.close()
        server.stop(0)


def test_a_request_ranks_the_retrieved_items_as_rank_does_by_ctr_times_bid(
        trained, searches, catalog, exports):
    model = trained["debias"][1]
    spec = model.spec
    loaded = tf.saved_model.load(searches["request"]).signatures
    rank = tf.saved_model.load(exports["debias"]).signatures["rank"]
    from export import ctr as export_ctr
    rows = export_ctr.sample_requests(spec, model.vocabularies, 3, seed=4)
    photos = list(catalog["image"][10:13])
    inputs = export_search.sample_requests(spec, rows, 3, 32)
    inputs.update(photo=np.array(photos, dtype=object), k=np.array([20, 20, 20], np.int32),
                  n=np.array([5, 5, 3], np.int32))
    out = {k: v.numpy() for k, v in loaded["request"](
        **{k: tf.constant(v) for k, v in inputs.items()}).items()}
    assert out["item_id"].shape == (3, 5) and (out["item_id"][2, 3:] == -1).all()
    retrieved, sims = search(searches["request"], photos, -1, 20)
    at = {int(i): r for r, i in enumerate(catalog["item_id"])}
    for b in range(3):
        # rank: the same photo, user and the 20 retrieved candidates with their catalog
        # features, position 0 (the export's candidate value), images from the item table.
        ids = retrieved[b]
        rows_b = [at[int(i)] for i in ids]
        page = {name: inputs[name][b:b + 1] for name in export_search.request_input_specs(spec)
                if name not in ("photo", "category", "k", "n")}
        page.update(item_id=ids[None], position=np.zeros([1, len(ids)], np.int64),
                    query_image=np.array([photos[b]], dtype=object),
                    item_image=np.full([1, len(ids)], b"", dtype=object),
                    **{c: catalog[c][rows_b][None] for c in ("shop_id", "brand_id",
                                                              "category_id", "price")})
        ctr = rank(**{k: tf.constant(v) for k, v in page.items()})["ctr"].numpy()[0]
        ecpm = ctr * catalog["bid"][rows_b]
        best = np.argsort(-ecpm, kind="stable")[:inputs["n"][b]]
        n = inputs["n"][b]
        np.testing.assert_array_equal(out["item_id"][b, :n], ids[best])
        np.testing.assert_allclose(out["ctr"][b, :n], ctr[best], atol=1e-5)
        np.testing.assert_allclose(out["bid"][b, :n], catalog["bid"][rows_b][best])
        np.testing.assert_allclose(out["ecpm"][b, :n], out["ctr"][b, :n] * out["bid"][b, :n],
                                   rtol=1e-6)
        np.testing.assert_allclose(out["similarity"][b, :n], sims[b][best], atol=1e-6)
        assert (np.diff(out["ecpm"][b, :n]) <= 0).all()
    assert len(set(catalog["bid"].tolist())) > 10  # the world's bids vary
    bad = dict(inputs, n=np.array([5, 21, 3], np.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"request:1.*n.*\[1, k\].*got.*21"):
        loaded["request"](**{k: tf.constant(v) for k, v in bad.items()})


def test_search_exports_hold_core_ops_and_run_in_saved_model_cli(searches, catalog, tmp_path):
    core = set(dir(tf.raw_ops))
    for name in ("search", "request"):
        ops = ops_of(searches[name])
        assert ops <= core and not ops & {"PyFunc", "EagerPyFunc"}, sorted(ops - core)
        assert {"MatMul", "TopKV2"} <= ops
    np.save(tmp_path / "images.npy", np.array(catalog["image"][:1], dtype="S"))
    np.save(tmp_path / "category.npy", np.array([-1], np.int64))
    np.save(tmp_path / "k.npy", np.array([K], np.int32))
    out = tmp_path / "out"
    run_ok([CLI, "run", "--dir", searches["search"], "--tag_set", "serve", "--signature_def",
            "search", "--inputs", ";".join(f"{name}={tmp_path / name}.npy"
                                           for name in ("images", "category", "k")),
            "--outdir", str(out)])
    ids = np.load(out / "item_id.npy")
    assert ids.shape == (1, K) and ids[0, 0] == catalog["item_id"][0]
    warmup = common.read_warmup(searches["request"])
    assert {log.predict_log.request.model_spec.signature_name for log in warmup} == {
        "search", "request"}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through its chromedriver (Debian's packages; installed by
    scripts/install_browser.sh when missing)."""
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        run_ok(["sh", os.path.join(REPO, "scripts", "install_browser.sh")])
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1280,1500",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


def test_the_search_page_shows_a_photos_ads_by_ecpm_in_chromium(
        searches, tiny_world, catalog, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from serving import search_page
    servables = stand_in_server.Servables({"search": os.path.dirname(searches["request"])})
    rest, rest_port = stand_in_server.start_rest(servables)
    spec = client_lib.spec_of_export(searches["request"])
    page = search_page.SearchPage(search_page.PageData(tiny_world, spec), spec,
                                  f"http://127.0.0.1:{rest_port}").start()
    try:
        browser.get(page.url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#user option")) > 0)

        def results(count: int) -> list:
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result")) == count
                       and all(d.execute_script("return arguments[0].complete && arguments[0]"
                                                ".naturalWidth > 0", i)
                               for i in d.find_elements(By.CSS_SELECTOR, ".result img")))
            return browser.find_elements(By.CSS_SELECTOR, ".result")

        # Upload a photo: the grid holds the model server's top 10 by eCPM for it.
        photo = tmp_path / "photo.png"
        photo.write_bytes(catalog["image"][7])
        browser.find_element(By.ID, "upload").send_keys(str(photo))
        cards = results(10)
        ecpm = [float(c.get_attribute("data-ecpm")) for c in cards]
        assert ecpm == sorted(ecpm, reverse=True)
        direct = client_lib.RestClient(f"http://127.0.0.1:{rest_port}").request(
            catalog["image"][7], page.data.users[0], spec, -1, 100, 10)
        assert [int(c.get_attribute("data-item-id")) for c in cards] == direct["item_id"].tolist()
        np.testing.assert_allclose(ecpm, direct["ecpm"], rtol=1e-5)
        shot = tmp_path / "search_page.png"
        browser.save_screenshot(str(shot))
        grid = tmp_path / "grid.png"
        browser.find_element(By.ID, "results").screenshot(str(grid))
        image = np.asarray(Image.open(grid).convert("RGB"), np.float32)
        # Ten 150-px cards fill at least one row of the grid, and it is not blank.
        assert image.shape[1] >= 4 * 150 and image.shape[0] >= 150 and image.std() > 10
        print(f"search page screenshot: {shot}")

        # Pick a query photo: its category is set and every ad is of that category.
        first = browser.find_elements(By.CSS_SELECTOR, "#queries img")[0]
        category = int(first.get_attribute("title").rsplit(" ", 1)[1])
        first.click()
        wait.until(lambda d: d.find_element(By.ID, "category").get_attribute("value")
                   == str(category))
        wait.until(lambda d: "ads in" in d.find_element(By.ID, "status").text)
        cards = browser.find_elements(By.CSS_SELECTOR, ".result")
        category_of = dict(zip(catalog["item_id"].tolist(), catalog["category_id"].tolist(),
                               strict=True))
        assert cards and {category_of[int(c.get_attribute("data-item-id"))]
                          for c in cards} == {category}
    finally:
        page.stop()
        rest.shutdown()
