"""mtl.data.resize: bilinear / area / nearest / masked-bilinear resizing and the crop window,
on hand-worked cases and against jax.image.scale_and_translate (no antialiasing)."""
import numpy as np
import pytest

from mtl.data.resize import Resize, bilinear_taps, nearest_index


def _full(hw):
    return (0, 0) + tuple(hw)


def test_bilinear_hand_worked():
    x = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    # a 2x downsample samples between pixel pairs: the 2x2 block means
    np.testing.assert_allclose(Resize((2, 2)).apply_image(x, _full((4, 4)))[..., 0], [[2.5, 4.5], [10.5, 12.5]])
    # 2 -> 4 samples at -0.25 (clamped), 0.25, 0.75, 1.25 (clamped): [a, .75a + .25b, .25a + .75b, b]
    row = np.array([[0.0, 4.0]], np.float32)[..., None]
    np.testing.assert_allclose(Resize((1, 4)).apply_image(row, _full((1, 2)))[0, :, 0], [0.0, 1.0, 3.0, 4.0])
    lo, hi, f = bilinear_taps(2, 4)
    assert lo.tolist() == [0, 0, 0, 1] and hi.tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(f, [0.0, 0.25, 0.75, 0.0])


def test_area_and_nearest_hand_worked():
    x = np.arange(6, dtype=np.float32).reshape(1, 6, 1)
    # 6 -> 4: output pixels average [0, 1.5), [1.5, 3), [3, 4.5), [4.5, 6)
    got = Resize((1, 4), image="area").apply_image(x, _full((1, 6)))[0, :, 0]
    np.testing.assert_allclose(got, [0.5 / 1.5, 2.5 / 1.5, 5.0 / 1.5, 7.0 / 1.5], rtol=1e-6)
    y = np.arange(16).reshape(4, 4)
    out = Resize((2, 2)).apply_labels(y, _full((4, 4)))
    assert out.dtype == y.dtype and out.tolist() == [[5, 7], [13, 15]]     # floor((i + .5) * 2) = 1, 3
    assert nearest_index(5, 3).tolist() == [0, 2, 4] and nearest_index(2, 4).tolist() == [0, 0, 1, 1]
    assert Resize((1, 4)).apply_labels(np.array([[-1, 7]]), _full((1, 2))).tolist() == [[-1, -1, 7, 7]]


def test_crop_window_keeps_the_aspect_ratio():
    r = Resize((2, 2), fit="crop")
    assert r.window((4, 8)) == (0, 2, 4, 4) and r.window((8, 4)) == (2, 0, 4, 4)
    assert Resize((3, 4), fit="crop").window((6, 4)) == (1, 0, 3, 4)
    assert Resize((3, 4)).window((6, 4)) == (0, 0, 6, 4)                  # stretch: the whole image
    x = np.arange(32, dtype=np.float32).reshape(4, 8, 1)
    got = r.apply_image(x, r.window((4, 8)))[..., 0]                       # columns 2..5, 2x2 block means
    np.testing.assert_allclose(got, [[6.5, 8.5], [22.5, 24.5]])


def test_float_maps_nearest_or_masked_bilinear():
    y = np.array([[1.0, np.nan], [3.0, 5.0]], np.float32)[..., None]
    assert Resize((1, 1)).apply_values(y, _full((2, 2))).item() == 5.0        # nearest: pixel (1, 1)
    masked = Resize((1, 1), depth="bilinear")
    assert masked.apply_values(y, _full((2, 2))).item() == pytest.approx(3.0)  # mean of the 3 valid taps
    assert np.isnan(masked.apply_values(np.full((2, 2, 1), np.nan, np.float32), _full((2, 2)))).all()
    row = np.array([[2.0, np.nan]], np.float32)[..., None]
    got = Resize((1, 4), depth="bilinear").apply_values(row, _full((1, 2)))[0, :, 0]
    np.testing.assert_allclose(got, [2.0, 2.0, 2.0, np.nan])                # only NaN taps -> NaN


@pytest.mark.parametrize("hw,size", [((7, 5), (3, 9)), ((6, 8), (3, 4)), ((5, 5), (8, 2))])
def test_bilinear_matches_jax_scale_and_translate(hw, size):
    import jax
    import jax.numpy as jnp

    x = np.random.default_rng(0).normal(size=hw + (2,)).astype(np.float32)
    scale = jnp.array([size[0] / hw[0], size[1] / hw[1]])
    want = jax.image.scale_and_translate(jnp.asarray(x), size + (2,), (0, 1), scale, jnp.zeros(2),
                                         "linear", antialias=False)
    np.testing.assert_allclose(Resize(size).apply_image(x, _full(hw)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bad_options_are_one_line_errors():
    for size in [(0, 3), (2,), "ab", (2.5, 2), (True, 2)]:
        with pytest.raises(ValueError, match="size must be \\(height, width\\)"):
            Resize(size)
    with pytest.raises(ValueError, match="fit must be one of \\('stretch', 'crop'\\), got 'pad'"):
        Resize((2, 2), fit="pad")
    with pytest.raises(ValueError, match="image must be one of"):
        Resize((2, 2), image="cubic")
    with pytest.raises(ValueError, match="depth must be one of"):
        Resize((2, 2), depth="area")
    with pytest.raises(ValueError, match="unknown options \\['mode'\\]"):
        Resize.of({"size": (2, 2), "mode": "x"})
    assert Resize.of((2, 3)) == Resize((2, 3)) and Resize.of(None) is None
    assert Resize.of({"size": [4, 5], "fit": "crop"}) == Resize((4, 5), fit="crop")
