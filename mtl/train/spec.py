"""``config.optim`` resolved: :class:`OptimSpec`, a frozen description of how the train step
treats the tasks' gradients (which aggregator, on which quantity, with which extras).

Which *route* computes what the aggregator needs follows from it
(:func:`mtl.train.routes.make_route`); this module only validates and describes."""
from __future__ import annotations

import dataclasses

from mtl.optim import get_aggregator

GRAD_ON = ("params", "representation")
JACOBIAN = ("keep", "stream", "gram")
HEAD_GRADS = ("plain", "weighted")
SPARSE_CRITERIA = ("magnitude", "saliency")


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    aggregator: str = "ew"
    hparams: tuple = ()
    grad_on: str = "params"
    jacobian: str = "keep"
    head_grads: str = "plain"
    fmtl_rho: float = 0.0
    sparse_fraction: float = 0.0
    sparse_criterion: str = "magnitude"
    rep_mtl: float = 0.0
    diagnostics_every: int = 0

    @classmethod
    def from_config(cls, c=None) -> "OptimSpec":
        if c is None:
            return cls()
        if isinstance(c, OptimSpec):
            return c
        d = dict(c.to_dict() if hasattr(c, "to_dict") else c)
        hp = d.pop("hparams", {}) or {}
        hp = dict(hp.to_dict() if hasattr(hp, "to_dict") else hp)
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - fields)
        if bad:
            raise KeyError(f"unknown optim key(s) {bad}; valid: {sorted(fields)}")
        spec = cls(hparams=tuple(sorted(hp.items())), **d)
        spec.validate()
        return spec

    def validate(self) -> None:
        agg = self.make_aggregator()  # unknown name / hyper-parameter: the registry's error
        if "jac" in agg.needs:  # a method that combines J itself
            if self.jacobian != "keep" or self.fmtl_rho > 0:
                raise ValueError(f"optim.aggregator={self.aggregator!r} combines the per-task gradients "
                                 "themselves: it needs optim.jacobian='keep' and no F-MTL (optim.fmtl_rho=0)")
            if self.grad_on == "representation" and agg.name != "graddrop":
                raise ValueError(f"optim.aggregator={self.aggregator!r} keeps per-task parameter gradients in "
                                 "its state: it needs optim.grad_on='params' (of these methods only graddrop "
                                 "works on the representation)")
        if self.grad_on not in GRAD_ON:
            raise ValueError(f"optim.grad_on must be one of {GRAD_ON}; got {self.grad_on!r}")
        if self.jacobian not in JACOBIAN:
            raise ValueError(f"optim.jacobian must be one of {JACOBIAN}; got {self.jacobian!r}")
        if self.jacobian != "keep" and self.fmtl_rho > 0:
            raise ValueError(f"optim.jacobian={self.jacobian!r} does not keep the per-task gradients that F-MTL "
                             "(optim.fmtl_rho > 0) perturbs along; use optim.jacobian='keep'")
        if self.jacobian == "gram" and self.sparse_fraction > 0:
            raise ValueError("optim.jacobian='gram' never forms the per-task parameter gradients that sparse "
                             "training (optim.sparse_fraction > 0) masks; use optim.jacobian='keep' or 'stream'")
        if self.head_grads not in HEAD_GRADS:
            raise ValueError(f"optim.head_grads must be one of {HEAD_GRADS}; got {self.head_grads!r}")
        if self.sparse_criterion not in SPARSE_CRITERIA:
            raise ValueError(f"optim.sparse_criterion must be one of {SPARSE_CRITERIA}; got "
                             f"{self.sparse_criterion!r}")
        if not 0.0 <= float(self.sparse_fraction) < 1.0:
            raise ValueError(f"optim.sparse_fraction must be in [0, 1) (0 = off); got {self.sparse_fraction}")
        for k in ("fmtl_rho", "rep_mtl"):
            if float(getattr(self, k)) < 0:
                raise ValueError(f"optim.{k} must be >= 0; got {getattr(self, k)}")
        if self.fmtl_rho > 0 and self.grad_on != "params":
            raise ValueError("optim.fmtl_rho > 0 (F-MTL) perturbs the shared parameters: it needs "
                             "optim.grad_on='params'")
        if self.rep_mtl > 0 and self.grad_on != "representation":
            raise ValueError("optim.rep_mtl > 0 (Rep-MTL) regularises representation saliencies: it needs "
                             "optim.grad_on='representation'")
        if int(self.diagnostics_every) < 0:
            raise ValueError(f"optim.diagnostics_every must be >= 0; got {self.diagnostics_every}")

    def make_aggregator(self):
        return get_aggregator(self.aggregator, **dict(self.hparams))

    @property
    def is_plain_ew(self) -> bool:
        return (self.aggregator.lower() == "ew" and self.fmtl_rho == 0 and self.sparse_fraction == 0
                and self.rep_mtl == 0)
