"""Task vectors, path utilities, filters and validation (mtl.merging.tree)."""
import re
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import mtl.merging as mm


def make_tree(rng, head=False):
    t = {"encoder": {"layers": {0: {"kernel": rng.normal(size=(4, 6)).astype(np.float32),
                                    "bias": rng.normal(size=(6,)).astype(np.float32)},
                                1: {"kernel": rng.normal(size=(6, 6)).astype(np.float32),
                                    "bias": rng.normal(size=(6,)).astype(np.float32)}}},
         "norm": {"scale": rng.normal(size=(6,)).astype(np.float32)}}
    if head:
        t["heads"] = {"a": {"kernel": rng.normal(size=(6, 2)).astype(np.float32)}}
    return t


def test_flatten_unflatten_roundtrip_keeps_int_keys():
    t = make_tree(np.random.default_rng(0))
    flat = mm.flatten(t)
    assert list(flat) == ["encoder/layers/0/bias", "encoder/layers/0/kernel", "encoder/layers/1/bias",
                          "encoder/layers/1/kernel", "norm/scale"]
    back = mm.unflatten(flat, like=t)
    assert set(back["encoder"]["layers"]) == {0, 1}
    np.testing.assert_array_equal(back["encoder"]["layers"][1]["kernel"], t["encoder"]["layers"][1]["kernel"])
    plain = mm.unflatten(flat)
    assert set(plain["encoder"]["layers"]) == {"0", "1"}
    with pytest.raises(ValueError, match="norm/scale"):
        mm.unflatten({k: v for k, v in flat.items() if k != "norm/scale"}, like=t)


def test_path_filter_glob_and_regex():
    keep = mm.path_filter(exclude=["*bias", re.compile(r"^norm/")])
    assert keep("encoder/layers/0/kernel")
    assert not keep("encoder/layers/0/bias") and not keep("norm/scale")
    keep = mm.path_filter(include="re:layers/1/", exclude="*bias")
    assert keep("encoder/layers/1/kernel") and not keep("encoder/layers/0/kernel")
    assert not keep("encoder/layers/1/bias")


def test_task_vector_values_and_exclusions():
    rng = np.random.default_rng(1)
    pre, ft = make_tree(rng), make_tree(rng, head=True)
    tv = mm.task_vector(ft, pre, exclude=["heads/*", "*bias"])
    flat, fpre, fft = mm.flatten(tv), mm.flatten(pre), mm.flatten(ft)
    assert set(flat) == set(fpre)  # heads dropped, structure of pretrained
    for p, v in flat.items():
        if p.endswith("bias"):
            assert v is None
        else:
            np.testing.assert_array_equal(v, fft[p] - fpre[p])
    merged = mm.task_arithmetic(pre, [tv, tv], lam=0.5)
    np.testing.assert_array_equal(merged["encoder"]["layers"][0]["bias"], pre["encoder"]["layers"][0]["bias"])
    np.testing.assert_allclose(merged["norm"]["scale"], ft["norm"]["scale"], rtol=1e-6, atol=1e-6)


def test_task_vector_requires_excluding_heads():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match=r"heads/a/kernel.*exclude"):
        mm.task_vector(make_tree(rng, head=True), make_tree(rng))


def test_include_filter():
    rng = np.random.default_rng(3)
    pre, ft = make_tree(rng), make_tree(rng)
    tv = mm.flatten(mm.task_vector(ft, pre, include=["encoder/*kernel"]))
    assert [p for p, v in tv.items() if v is not None] == ["encoder/layers/0/kernel", "encoder/layers/1/kernel"]


def test_mismatch_messages_name_path_shapes_dtypes():
    rng = np.random.default_rng(4)
    a, b = make_tree(rng), make_tree(rng)
    b["encoder"]["layers"][0]["kernel"] = np.zeros((4, 7), np.float32)
    with pytest.raises(ValueError, match=r"encoder/layers/0/kernel.*\(4, 6\) float32.*\(4, 7\) float32"):
        mm.check_compatible(a, b, names=["pretrained", "task_b"])
    b = make_tree(rng)
    b["norm"]["scale"] = b["norm"]["scale"].astype(np.float16)
    with pytest.raises(ValueError, match=r"norm/scale.*float32.*float16"):
        mm.check_compatible(a, b)
    b = make_tree(rng)
    del b["encoder"]["layers"][1]["bias"]
    with pytest.raises(ValueError, match=r"'task_b' lacks parameter 'encoder/layers/1/bias'"):
        mm.check_compatible(a, b, names=["pretrained", "task_b"])
    with pytest.raises(ValueError, match=r"'model 1' has parameter 'heads/a/kernel'"):
        mm.check_compatible(a, make_tree(rng, head=True))


def test_non_finite_values_raise_with_path_and_model():
    rng = np.random.default_rng(5)
    a, b = make_tree(rng), make_tree(rng)
    b["encoder"]["layers"][1]["kernel"][2, 3] = np.nan
    with pytest.raises(ValueError, match=r"'encoder/layers/1/kernel' of 'task_b' has non-finite"):
        mm.check_compatible(a, b, names=["pretrained", "task_b"])
    with pytest.raises(ValueError, match="non-finite"):
        mm.task_vector(b, a)


def test_identical_finetune_warns():
    rng = np.random.default_rng(6)
    a = make_tree(rng)
    with pytest.warns(UserWarning, match="identical"):
        mm.check_compatible(a, a, names=["pretrained", "task_a"])
    with pytest.warns(UserWarning, match="identical"):
        tv = mm.task_vector(a, a)
    with pytest.warns(UserWarning, match="all zeros"):
        mm.average(a, [tv, mm.task_vector(make_tree(rng), a)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mm.check_compatible(a, make_tree(rng))


def test_mixed_exclusion_across_tasks_raises():
    rng = np.random.default_rng(7)
    pre = make_tree(rng)
    t1 = mm.task_vector(make_tree(rng), pre, exclude="*bias")
    t2 = mm.task_vector(make_tree(rng), pre)
    with pytest.raises(ValueError, match="encoder/layers/0/bias.*excluded"):
        mm.average(pre, [t1, t2])


def test_non_float_leaves_are_excluded():
    rng = np.random.default_rng(8)
    pre, ft = make_tree(rng), make_tree(rng)
    pre["count"], ft["count"] = jnp.array(3, jnp.int32), jnp.array(5, jnp.int32)
    tv = mm.task_vector(ft, pre)
    assert tv["count"] is None
    assert int(mm.average(pre, [tv])["count"]) == 3


def test_nnx_state_and_pure_dict_give_the_same_merge():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, seed):
            self.layers = nnx.List([nnx.Linear(2, 3, rngs=nnx.Rngs(seed + i)) for i in range(2)])

    pre, fts = nnx.state(Net(0), nnx.Param), [nnx.state(Net(s), nnx.Param) for s in (1, 2)]
    assert list(mm.flatten(pre)) == list(mm.flatten(nnx.to_pure_dict(pre)))
    merged = mm.ties(pre, mm.task_vectors(fts, pre, exclude="*bias"), k=50)
    assert isinstance(merged, nnx.State)
    pure = mm.ties(nnx.to_pure_dict(pre), mm.task_vectors([nnx.to_pure_dict(f) for f in fts],
                                                          nnx.to_pure_dict(pre), exclude="*bias"), k=50)
    model = Net(0)
    nnx.update(model, merged)
    np.testing.assert_array_equal(model.layers[1].kernel[...], pure["layers"][1]["kernel"])
    np.testing.assert_array_equal(model.layers[1].bias[...], nnx.to_pure_dict(pre)["layers"][1]["bias"])
