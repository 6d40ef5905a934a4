"""Config files, command-line overrides and validation.

A config file is Python defining ``get_config(arg=None) -> ml_collections.ConfigDict``;
``configs/x.py:arg`` passes ``arg``. Overrides ``--config.train.steps=500`` set existing
keys only (values parsed as Python literals, else kept as strings); an unknown key is an
error that lists the keys at that level and suggests the closest one.

``base_config()`` holds every key the trainer reads, with defaults; experiment configs
start from it and change what they need.

``train.accum_steps`` (default 1 = off): gradient accumulation. Each global batch of
``train.batch_size`` is split into ``accum_steps`` equal micro-batches processed in turn
inside the jitted step (a ``lax.scan``; memory of one micro-batch), then one optimizer
update. Exact for every aggregator (label-count weighted, also with partial labels); F-MTL,
Rep-MTL and ``optim.jacobian='stream'`` are refused. MoE models with a
global-batch load-balancing loss pool its statistics over the micro-batches (one extra
forward per step). See ``mtl/train/step.py``.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections

from mtl.sharding import DEFAULT_RULES

# config entries whose contents are free-form (passed on as keyword arguments), not checked
FREE_FORM = ("kwargs", "encoder_kwargs", "arch_kwargs", "hparams", "parscale")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.name = ""
    c.data = ml_collections.ConfigDict({
        "name": "multitab",       # mtl.data registry name
        "kwargs": {},             # the loader's arguments
        "tasks": (),              # subset of the dataset's task names; () = all
        "val_fraction": 0.1,      # validation carved from train (never from test)
        "seed": 0,                # batching order / validation split
    })
    c.model = ml_collections.ConfigDict({
        "arch": "shared",         # shared = one encoder + one head per task
        "encoder": "mlp",
        "encoder_kwargs": {},
        "head_hidden": (),        # hidden widths of every task head
        "arch_kwargs": {},        # extra options of non-default architectures
        "parscale": {},           # model.arch="lm": ParScale options {P, prefix_len, reparam, ...}
    })
    c.train = ml_collections.ConfigDict({
        "steps": 1000,
        "batch_size": 128,        # the global batch of one optimizer step
        "accum_steps": 1,         # gradient accumulation: split each batch into this many equal
                                  # micro-batches run one after another in the step (memory of
                                  # batch_size/accum_steps; one update). 1 = off. Any
                                  # aggregator except F-MTL / Rep-MTL / jacobian=stream;
                                  # exact (label-count weighted); pooled MoE LBL (mtl/train/step.py)
        "eval_batch_size": 512,
        "log_every": 50,
        "eval_every": 250,
        "checkpoint_every": 250,
        "keep_checkpoints": 2,
        "select": "best",         # best (lowest mean validation loss) or last
        "on_nonfinite": "raise",  # raise (stop, name step and task) or skip (count and go on)
        "max_skip_fraction": 0.25,  # skip mode: stop once more than this fraction of train.steps was skipped
        "loss_weights": (),       # fixed per-task loss weights; () = all 1
        "curves": True,           # redraw workdir/curves.png at each evaluation (background thread)
        "slim_table": True,       # model.arch=slimmable: after `mtl train`, build RUN/slim_table.json
                                  # (mtl slim's lookup table, on the validation split) and print its
                                  # uniform-width rows
    })
    c.optimizer = ml_collections.ConfigDict({
        "name": "adamw", "lr": 1e-3, "schedule": "cosine", "warmup_steps": 0,
        "weight_decay": 1e-4, "momentum": 0.9, "grad_clip": 0.0,
    })
    # multi-task optimisation (mtl.optim aggregators inside the train step; mtl/train/routes/)
    c.optim = ml_collections.ConfigDict({
        "aggregator": "ew",       # ew rlw uw dwa gradnorm famo mgda pcgrad cagrad imtl_g nash_mtl
                                  # aligned_mtl upgrad dualproj gls stch constant gradvac config
                                  # fairgrad krum modo sdmgrad (mtl.optim.AGGREGATORS); J itself:
                                  # graddrop trimmed_mean moco db_mtl excess_mtl (JAC_AGGREGATORS)
        "hparams": {},            # the method's hyper-parameters, e.g. {"c": 0.4} for cagrad
        "grad_on": "params",      # per-task gradients on the shared params, or "representation"
        "jacobian": "keep",       # "stream": build G without keeping J (params; 1 more backward);
                                  # "gram": G from layer inputs x output cotangents, no J at all
        "head_grads": "plain",    # heads get their own unweighted loss's gradient, or "weighted"
        "fmtl_rho": 0.0,          # F-MTL perturbation radius (0 = off; needs grad_on=params)
        "sparse_fraction": 0.0,   # train only this fraction of shared params (0 = all)
        "sparse_criterion": "magnitude",  # top-k by |θ| at init, or "saliency": |θ ⊙ ∇Σ L_t| on step 0
        "rep_mtl": 0.0,           # Rep-MTL regulariser weight (0 = off; needs grad_on=representation)
        "diagnostics_every": 0,   # log task weights/cosines/conflicts/grad norms every N steps
    })
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    # logical axis -> mesh axes (see mtl.sharding); a list of [logical_name, mesh_axis or list or None]
    c.rules = [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in DEFAULT_RULES]
    c.baselines = ml_collections.ConfigDict({
        "train": False,           # also train one single-task model per task (for Δm%)
        "from_dir": "",           # or reuse baselines stored under this directory
    })
    return c


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Load ``path/to/config.py[:arg]`` and call its ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    mod_name = "mtl_config_" + os.path.splitext(os.path.basename(path))[0]
    s = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ValueError(f"config file {path} defines no get_config(arg=None)")
    cfg = mod.get_config(arg or None) if arg else mod.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        cfg = ml_collections.ConfigDict(cfg)
    return cfg


def _parse_value(text: str, current: Any):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, str) and not isinstance(value, str):
        return text  # a string field keeps the text as typed (--config.name=2024)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        value = type(current)(value)
    return value


def _keys(d) -> list[str]:
    return list(d.keys()) if hasattr(d, "keys") else []


def set_override(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    parts = dotted.split(".")
    node = cfg
    for i, p in enumerate(parts):
        keys = _keys(node)
        last = i == len(parts) - 1
        is_free_dict = isinstance(node, dict) or (i > 0 and parts[i - 1] in FREE_FORM)
        if p not in keys and not (last and is_free_dict):
            where = ".".join(parts[:i]) or "config"
            close = difflib.get_close_matches(p, keys, n=1)
            hint = f" Did you mean {'.'.join(parts[:i] + [close[0]])!r}?" if close else ""
            raise KeyError(f"unknown config key {dotted!r}: {where} has no key {p!r} "
                           f"(its keys: {', '.join(sorted(keys))}).{hint}")
        if last:
            current = node[p] if p in keys else None
            value = _parse_value(text, current)
            try:
                node[p] = value
            except TypeError as e:
                raise TypeError(f"--config.{dotted}={text}: {e}") from None
        else:
            node = node[p]


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``["train.steps=500", ...]`` (the part after ``--config.``)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} must look like key.sub=value")
        k, v = o.split("=", 1)
        set_override(cfg, k, v)
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Check keys against ``base_config`` (unknown keys name the closest valid one)."""
    _walk_keys(cfg, base_config())
    _check_values(cfg)


def _check_values(cfg) -> None:
    t = cfg.train
    if t.select not in ("best", "last"):
        raise ValueError(f"train.select must be 'best' or 'last'; got {t.select!r}")
    if t.on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"train.on_nonfinite must be 'raise' or 'skip'; got {t.on_nonfinite!r}")
    for k in ("steps", "batch_size", "eval_batch_size", "log_every", "eval_every", "checkpoint_every",
              "accum_steps"):
        if int(t[k]) <= 0:
            raise ValueError(f"train.{k} must be positive; got {t[k]}")
    if int(t.batch_size) % int(t.accum_steps):
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.accum_steps={t.accum_steps}: "
                         "gradient accumulation splits each batch into equal micro-batches; make the batch "
                         "size a multiple of accum_steps")
    f = float(t.max_skip_fraction)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"train.max_skip_fraction must be in [0, 1]; got {t.max_skip_fraction}")
    if "optimizer" in cfg:
        _check_optimizer(cfg.optimizer)
    if "optim" in cfg:
        from mtl.train.spec import OptimSpec

        OptimSpec.from_config(cfg.optim)  # unknown aggregator: lists the valid names


def _check_optimizer(o) -> None:
    import math

    lr = float(o.lr)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"optimizer.lr must be a positive finite number; got {o.lr} "
                         "(a negative learning rate would train by gradient ascent)")
    for k in ("warmup_steps", "weight_decay", "grad_clip", "momentum"):
        if k in o and (o[k] is not None) and not float(o[k]) >= 0:
            raise ValueError(f"optimizer.{k} must be >= 0; got {o[k]}")


def with_defaults(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``base_config()`` updated with ``cfg`` (so every key the trainer reads exists)."""
    if not isinstance(cfg, ml_collections.ConfigDict):
        cfg = ml_collections.ConfigDict(cfg)
    _walk_keys(cfg, base_config())
    out = base_config()
    out.update_from_flattened_dict({k: v for k, v in _flatten(cfg.to_dict()).items()})
    _check_values(out)
    return out


def _walk_keys(cfg, ref, prefix=""):
    for k in _keys(cfg):
        if k not in _keys(ref):
            close = difflib.get_close_matches(k, _keys(ref), n=1)
            hint = f" Did you mean {prefix + close[0]!r}?" if close else ""
            raise KeyError(f"unknown config key {prefix + k!r}.{hint} Valid keys here: {', '.join(sorted(_keys(ref)))}")
        if k not in FREE_FORM + ("rules",) and isinstance(ref[k], ml_collections.ConfigDict):
            _walk_keys(cfg[k], ref[k], prefix + k + ".")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in FREE_FORM:
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def to_json(cfg: ml_collections.ConfigDict) -> dict:
    """A JSON-safe plain dict (tuples become lists)."""
    return json.loads(json.dumps(cfg.to_dict(), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def diff(a: dict, b: dict) -> list[str]:
    """Human-readable differences between two JSON configs."""
    fa, fb = _flatten_all(a), _flatten_all(b)
    out = []
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k, "<absent>") != fb.get(k, "<absent>"):
            out.append(f"{k}: {fa.get(k, '<absent>')!r} -> {fb.get(k, '<absent>')!r}")
    return out


def _flatten_all(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten_all(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out
