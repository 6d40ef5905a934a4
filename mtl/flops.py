"""FLOPs from the compiled program (XLA cost analysis), not counted by hand."""
from __future__ import annotations

import jax


def compiled_flops(jitted, *args, **kwargs) -> float:
    """FLOPs XLA reports for one call of ``jitted(*args)`` (lowered and compiled, not run)."""
    compiled = jitted.lower(*args, **kwargs).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def function_flops(fn, *args, **kwargs) -> float:
    return compiled_flops(jax.jit(fn), *args, **kwargs)
