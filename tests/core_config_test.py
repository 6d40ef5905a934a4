"""Config files, command-line overrides, validation and diffs."""
import textwrap

import ml_collections
import pytest

from mtl import config as C


def _get(cfg, dotted):
    node = cfg
    for p in dotted.split("."):
        node = node[p]
    return node


def test_apply_overrides_types_and_nesting():
    base = C.base_config()
    cfg = C.apply_overrides(base, [
        "train.steps=20",                      # int
        "optimizer.lr=1",                      # int literal into a float field -> 1.0
        "optimizer.weight_decay=3e-5",
        "model.head_hidden=[4, 5]",            # list into a tuple field -> tuple
        "data.tasks=('a','b')",
        "train.select=last",                   # not a literal -> kept as the string
        "name=my run",
        "optimizer.name='sgd'",                # quoted literal string
        "baselines.train=True",
        "data.kwargs.n_train=200",             # free-form kwargs: new keys allowed
        "data.kwargs.degrees=(1, 2)",
        "model.encoder_kwargs.hidden=(8,)",
        "mesh.fsdp=2",
        "data.val_fraction=0.25",
    ])
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.weight_decay == 3e-5
    assert cfg.model.head_hidden == (4, 5) and isinstance(cfg.model.head_hidden, tuple)
    assert cfg.data.tasks == ("a", "b")
    assert cfg.train.select == "last" and cfg.name == "my run" and cfg.optimizer.name == "sgd"
    assert cfg.baselines.train is True
    assert cfg.data.kwargs.n_train == 200 and cfg.data.kwargs.degrees == (1, 2)
    assert cfg.model.encoder_kwargs.hidden == (8,)
    assert cfg.mesh.fsdp == 2 and cfg.data.val_fraction == 0.25
    # the input config is not modified
    assert base.train.steps == 1000 and base.optimizer.lr == 1e-3 and "n_train" not in base.data.kwargs


def test_apply_overrides_existing_kwarg_keeps_float_type():
    cfg = C.base_config()
    cfg.data.kwargs = dict(noise=0.1, n_train=100)
    out = C.apply_overrides(cfg, ["data.kwargs.noise=1", "data.kwargs.n_train=5"])
    assert out.data.kwargs.noise == 1.0 and isinstance(out.data.kwargs.noise, float)
    assert out.data.kwargs.n_train == 5


def test_apply_overrides_value_with_equals_sign():
    out = C.apply_overrides(C.base_config(), ["name=a=b"])
    assert out.name == "a=b"


@pytest.mark.parametrize("override,where,suggest", [
    ("train.stepz=3", "train", "train.steps"),
    ("trian.steps=3", "config", "train"),
    ("optimizer.lr_=0.1", "optimizer", "optimizer.lr"),
])
def test_unknown_override_key_suggests(override, where, suggest):
    with pytest.raises(KeyError) as e:
        C.apply_overrides(C.base_config(), [override])
    msg = e.value.args[0]
    assert f"{where} has no key" in msg
    assert f"Did you mean {suggest!r}?" in msg


def test_override_needs_equals():
    with pytest.raises(ValueError, match="key.sub=value"):
        C.apply_overrides(C.base_config(), ["train.steps"])


def test_numeric_text_into_a_string_field():
    out = C.apply_overrides(C.base_config(), ["name=2024"])
    assert out.name == "2024"


def test_validate_unknown_keys_with_suggestion():
    cfg = C.base_config()
    cfg.trian = ml_collections.ConfigDict({"steps": 3})
    with pytest.raises(KeyError) as e:
        C.validate(cfg)
    assert "'trian'" in e.value.args[0] and "Did you mean 'train'?" in e.value.args[0]
    cfg = C.base_config()
    cfg.train.stpes = 3
    with pytest.raises(KeyError) as e:
        C.validate(cfg)
    assert "Did you mean 'train.steps'?" in e.value.args[0]
    # free-form dicts are not checked
    cfg = C.base_config()
    cfg.data.kwargs = dict(anything=1)
    cfg.model.encoder_kwargs = dict(whatever=(1,))
    C.validate(cfg)


@pytest.mark.parametrize("key,value,match", [
    ("select", "worst", "train.select"),
    ("on_nonfinite", "ignore", "train.on_nonfinite"),
    ("steps", 0, "train.steps must be positive"),
    ("batch_size", -1, "train.batch_size must be positive"),
])
def test_validate_bad_values(key, value, match):
    cfg = C.base_config()
    cfg.train[key] = value
    with pytest.raises(ValueError, match=match):
        C.validate(cfg)


def test_with_defaults_fills_missing_keys():
    cfg = C.base_config()
    cfg.train.steps = 7
    out = C.with_defaults(cfg)
    assert out.train.steps == 7 and out.train.batch_size == 128


def test_with_defaults_accepts_a_partial_config():
    out = C.with_defaults(ml_collections.ConfigDict({"train": {"steps": 5}}))
    assert out.train.steps == 5 and out.train.select == "best" and out.optimizer.lr == 1e-3


def test_json_roundtrip_through_with_defaults():
    cfg = C.apply_overrides(C.base_config(), ["data.tasks=('a',)", "model.head_hidden=(3,)",
                                              "model.encoder_kwargs.hidden=(8, 8)"])
    j = C.to_json(cfg)
    assert j["data"]["tasks"] == ["a"] and j["model"]["head_hidden"] == [3]
    back = C.with_defaults(ml_collections.ConfigDict(j))
    assert tuple(back.data.tasks) == ("a",) and tuple(back.model.head_hidden) == (3,)
    assert C.diff(C.to_json(back), j) == []


def _write_config(tmp_path, name="exp.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent("""
        from mtl.config import base_config

        def get_config(arg=None):
            c = base_config()
            c.name = "default" if arg is None else "arg-" + arg
            c.train.steps = 11
            return c
    """))
    return str(p)


def test_load_config_file_with_and_without_arg(tmp_path):
    path = _write_config(tmp_path)
    assert C.load_config_file(path).name == "default"
    cfg = C.load_config_file(path + ":small")
    assert cfg.name == "arg-small" and cfg.train.steps == 11


def test_load_config_file_returning_a_dict(tmp_path):
    p = tmp_path / "plain.py"
    p.write_text("def get_config(arg=None):\n    return {'seed': 3, 'name': arg or 'x'}\n")
    cfg = C.load_config_file(str(p) + ":y")
    assert isinstance(cfg, ml_collections.ConfigDict) and cfg.seed == 3 and cfg.name == "y"


def test_load_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        C.load_config_file(str(tmp_path / "nope.py"))
    p = tmp_path / "empty.py"
    p.write_text("x = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        C.load_config_file(str(p))


def test_diff():
    a = {"a": 1, "b": {"c": 2, "d": [1, 2]}, "gone": "x"}
    b = {"a": 1, "b": {"c": 3, "d": [1, 2]}, "new": 4}
    assert C.diff(a, b) == ["b.c: 2 -> 3", "gone: 'x' -> '<absent>'", "new: '<absent>' -> 4"]
    assert C.diff(a, a) == []
