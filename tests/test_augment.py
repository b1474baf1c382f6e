"""S1 augmentations (paper 000 §3.1): each operation does what it says, per image, reproducibly."""
import numpy as np
import tensorflow as tf

from trainer import configs
from trainer.data import augment

NONE = configs.AugmentConfig(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip_prob=0.0,
                             jitter_prob=0.0, greyscale_prob=0.0)
SEED = tf.constant([3, 4], tf.int64)


def images(n=8, size=16, seed=0):
    return tf.constant(np.random.default_rng(seed).random((n, size, size, 3)), tf.float32)


def test_identity_when_everything_is_off():
    x = images()
    np.testing.assert_allclose(augment.augment(x, SEED, NONE), x, atol=1e-5)


def test_flip_mirrors_horizontally():
    x = images()
    cfg = configs.AugmentConfig(**{**NONE.__dict__, "flip_prob": 1.0})
    np.testing.assert_allclose(augment.augment(x, SEED, cfg), x[:, :, ::-1], atol=1e-5)


def test_greyscale_makes_channels_equal_luma():
    x = images()
    cfg = configs.AugmentConfig(**{**NONE.__dict__, "greyscale_prob": 1.0})
    y = augment.augment(x, SEED, cfg).numpy()
    np.testing.assert_allclose(y[..., 0], y[..., 1], atol=1e-5)
    np.testing.assert_allclose(y[..., :1], tf.image.rgb_to_grayscale(x), atol=1e-5)


def test_crop_zooms_into_part_of_the_image():
    # A left-half-black / right-half-white image: a crop of a quarter of the area, resized back,
    # changes the black share for most images.
    x = np.zeros((16, 32, 32, 3), np.float32)
    x[:, :, 16:] = 1.0
    cfg = configs.AugmentConfig(**{**NONE.__dict__, "crop_area": (0.25, 0.25)})
    y = augment.augment(tf.constant(x), SEED, cfg).numpy()
    share_white = y.mean(axis=(1, 2, 3))
    assert np.std(share_white) > 0.1  # different crops per image
    assert y.shape == x.shape


def test_hue_jitter_changes_colour_but_not_luma_much():
    x = images(16)
    cfg = configs.AugmentConfig(**{**NONE.__dict__, "jitter_prob": 1.0, "brightness": 0.0,
                                   "contrast": 0.0, "saturation": 0.0, "hue": 0.5})
    y = augment.augment(x, SEED, cfg)
    assert float(tf.reduce_mean(tf.abs(y - x))) > 0.05
    luma = tf.image.rgb_to_grayscale
    # A rotation about the luma axis keeps luma, up to clipping into [0, 1].
    assert float(tf.reduce_mean(tf.abs(luma(y) - luma(x)))) < 0.05


def test_brightness_scales_per_image():
    x = tf.fill([8, 4, 4, 3], 0.5)
    cfg = configs.AugmentConfig(**{**NONE.__dict__, "jitter_prob": 1.0, "brightness": 0.5,
                                   "contrast": 0.0, "saturation": 0.0, "hue": 0.0})
    y = augment.augment(x, SEED, cfg).numpy()
    per_image = y.reshape(8, -1)
    np.testing.assert_allclose(per_image.std(1), 0, atol=1e-6)  # uniform within an image
    assert per_image[:, 0].std() > 0.02  # different factor per image
    assert ((per_image >= 0.25 - 1e-6) & (per_image <= 0.75 + 1e-6)).all()


def test_views_are_reproducible_and_differ_by_seed():
    x = images()
    a1, b1 = augment.two_views(x, SEED)
    a2, b2 = augment.two_views(x, SEED)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    assert float(tf.reduce_mean(tf.abs(a1 - b1))) > 0.01  # the two views differ
    a3, _ = augment.two_views(x, tf.constant([3, 5], tf.int64))
    assert float(tf.reduce_mean(tf.abs(a1 - a3))) > 0.01
    assert float(tf.reduce_min(a1)) >= 0.0 and float(tf.reduce_max(a1)) <= 1.0


def test_default_config_is_simclr():
    cfg = configs.AugmentConfig()
    assert cfg.crop_area == (0.08, 1.0) and cfg.jitter_prob == 0.8
    assert (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == (0.8, 0.8, 0.8, 0.2)
    assert cfg.greyscale_prob == 0.2 and cfg.flip_prob == 0.5
