"""Schema round trip: values written as Examples come back from the pipeline as documented."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, write_records
from trainer import data_format as docs
from trainer.ctr import spec as ctr_spec
from trainer.data import parse, pipeline, records, schema


def png(seed: int, size: int = 16) -> tuple[bytes, np.ndarray]:
    img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue(), img


def read(path, kind, image_size=16, image_store=None):
    cfg = pipeline.InputConfig(path, kind, global_batch_size=8, image_size=image_size,
                               shuffle=False, repeat=False, drop_remainder=False,
                               deterministic=True)
    pipe = pipeline.InputPipeline(cfg, image_store=image_store)
    with pipe.errors_named():
        return {k: v.numpy() for k, v in next(iter(pipe.dataset())).items()}


def test_catalog_round_trip(tmp_path):
    imgs = [png(i) for i in range(3)]
    rows = [dict(item_id=10**12 + i, image=imgs[i][0], category_id=7, shop_id=3 + i,
                 brand_id=0, price=12.5 * i, impressions_30d=i * 100) for i in range(3)]
    path = write_records(str(tmp_path / "c.tfrecord"),
                         [records.to_example(schema.CATALOG, r) for r in rows])
    out = read(path, "catalog")
    np.testing.assert_array_equal(out["item_id"], [10**12, 10**12 + 1, 10**12 + 2])
    np.testing.assert_allclose(out["price"], [0.0, 12.5, 25.0])
    np.testing.assert_array_equal(out["impressions_30d"], [0, 100, 200])
    # PNG is lossless and the size matches: pixels come back exactly, scaled to [0, 1].
    np.testing.assert_allclose(out["image"], np.stack([i[1] for i in imgs]) / 255.0, atol=1e-6)


def test_images_are_resized_to_the_configured_size(tmp_path):
    b, _ = png(0, size=40)
    path = write_records(str(tmp_path / "q.tfrecord"), [records.to_example(
        schema.QUERIES, dict(query_id=1, image=b, category_id=2))])
    assert read(path, "queries", image_size=24)["image"].shape == (1, 24, 24, 3)


def test_lists_pad_truncate_and_mask(tmp_path):
    long_hist = list(range(100, 130))  # 30 > max_length 20: the latest 20 are kept
    base = dict(label=1, user_id=5, age_bucket=2, gender=1, item_id=9, shop_id=1, brand_id=1,
                category_id=3, price=1.0, query_id=4, device=0, position=2, page_id=77)
    ctr = ctr_spec.record_kind("ctr")  # the synthetic feature spec's records
    recs = [records.to_example(ctr, dict(base, preferred_category_ids=[3, 4],
                                         click_history_item_ids=long_hist)),
            records.to_example(ctr, dict(base, preferred_category_ids=[],
                                         click_history_item_ids=[1, 2]))]
    out = read(write_records(str(tmp_path / "ctr.tfrecord"), recs), ctr)
    L = ctr.feature("click_history_item_ids").max_len
    np.testing.assert_array_equal(out["click_history_item_ids"][0], long_hist[-L:])
    np.testing.assert_array_equal(out["click_history_item_ids"][1], [1, 2] + [-1] * (L - 2))
    np.testing.assert_array_equal(out["click_history_item_ids_mask"].sum(1), [L, 2])
    np.testing.assert_array_equal(out["preferred_category_ids"], [[3, 4, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(out["preferred_category_ids_mask"].sum(1), [2, 0])


def test_pageviews_inline_and_joined_images_agree(tmp_path):
    imgs = {i: png(i) for i in range(1, 9)}
    store = parse.ImageStore(list(imgs), [imgs[i][0] for i in imgs])
    common = dict(user_id=1, pv_item_ids=[1, 2, 3, 4, 5, 6], pv_labels=[1, 0, 0, 1, 0, 0],
                  click_item_ids=[7, 8], day=3)
    inline = dict(common, pv_images=[imgs[i][0] for i in range(1, 7)],
                  click_images=[imgs[7][0], imgs[8][0]])
    recs = [records.to_example(schema.PAGEVIEWS, r) for r in (inline, common)]
    out = read(write_records(str(tmp_path / "pv.tfrecord"), recs), "pageviews", image_store=store)
    # pv lists keep the first l_pv = 5 items; images follow their ids.
    np.testing.assert_array_equal(out["pv_item_ids"], [[1, 2, 3, 4, 5]] * 2)
    np.testing.assert_array_equal(out["pv_labels"], [[1, 0, 0, 1, 0]] * 2)
    np.testing.assert_array_equal(out["click_item_ids"], [[7, 8, -1, -1, -1]] * 2)
    np.testing.assert_array_equal(out["pv_images"][0], out["pv_images"][1])
    np.testing.assert_array_equal(out["click_images"][0], out["click_images"][1])
    np.testing.assert_allclose(out["pv_images"][0, 2], imgs[3][1] / 255.0, atol=1e-6)
    np.testing.assert_allclose(out["click_images"][0, 1], imgs[8][1] / 255.0, atol=1e-6)
    assert not out["click_images"][:, 2:].any()  # padding positions stay zero
    assert "pv_images_mask" not in out  # image lists share the mask of their id list


def test_optional_scalar_default(tmp_path):
    b, _ = png(3)
    store = parse.ImageStore([42], [b])
    rec = records.to_example(schema.SEARCH_SESSIONS, dict(
        query_id=1, query_image=b, clicked_item_id=42, clicked_category_id=5))
    out = read(write_records(str(tmp_path / "s.tfrecord"), [rec]), "search_sessions",
               image_store=store)
    assert out["day"][0] == 0  # absent optional scalar gets its default
    np.testing.assert_array_equal(out["clicked_image"], out["query_image"])  # joined by id


def test_writer_rejects_missing_and_mistyped_features():
    with pytest.raises(ValueError, match="'price' is missing"):
        records.to_example(schema.CATALOG, dict(item_id=1, image=b"x", category_id=1, shop_id=1,
                                                brand_id=1, impressions_30d=1))
    with pytest.raises(TypeError, match="'item_id'"):
        records.to_example(schema.CATALOG, dict(item_id="one", image=b"x", category_id=1,
                                                shop_id=1, brand_id=1, price=1.0,
                                                impressions_30d=1))


def test_serialization_is_deterministic():
    row = dict(item_id=1, image=b"\xff\xd8\xff", category_id=1, shop_id=2, brand_id=3,
               price=4.0, impressions_30d=5)
    shuffled = dict(reversed(list(row.items())))
    assert records.to_example(schema.CATALOG, row) == records.to_example(schema.CATALOG, shuffled)


def test_data_format_doc_is_in_sync_with_schema():
    with open(os.path.join(REPO, "docs", "data_format.md")) as f:
        text = f.read()
    generated = text.split(docs.BEGIN, 1)[1].split(docs.END, 1)[0]
    assert generated.strip() == docs.render_tables().strip(), "run `make docs`"
    for name in schema.KIND_NAMES:
        for feature in ctr_spec.record_kind(name).features:
            assert f"`{feature.name}`" in generated
