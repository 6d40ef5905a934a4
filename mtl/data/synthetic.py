"""Synthetic multi-task regression with controllable task relatedness.

Two generators, both plain numpy and deterministic for a seed:

* :func:`mmoe_synthetic` -- the two-task generator of the MMoE paper (Ma et al.,
  KDD 2018), where the cosine ``p`` between the tasks' weight vectors sets how
  related the tasks are.
* :func:`multitab_synthetic` -- MultiTab-Bench style: ``T`` tasks whose weight
  vectors have pairwise cosine ``rho``, with a per-task polynomial degree as a
  complexity knob.

Randomness: each generator uses three independent numpy streams,
``default_rng([seed, 0])`` for the generator parameters, ``[seed, 1]`` for the
train split and ``[seed, 2]`` for the test split. So the test set does not
change when ``n_train`` changes, and train and test share the same parameters.
(``mmoe_synthetic`` draws its sine parameters from a fourth stream, ``[sine_seed, 3]``,
so they stay fixed across ``seed``.)
Nothing is standardised: inputs and labels are returned as generated (float32),
and every parameter needed to re-derive the labels is in ``bundle.meta``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from mtl.data.base import ArraySource, DataBundle, TaskInfo


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_real(name: str, value, lo=-math.inf, hi=math.inf) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{name} must be a finite number in [{lo}, {hi}], got {value!r}")
    return v


def _streams(seed):
    seed = _check_count("seed", seed, 0)
    return tuple(np.random.default_rng([seed, k]) for k in range(3))


def _regression_bundle(name, task_names, xs, ys, meta) -> DataBundle:
    (x_tr, x_te), (y_tr, y_te) = xs, ys
    tasks = [TaskInfo(t, "regression", 1) for t in task_names]
    train = ArraySource(x_tr.astype(np.float32),
                        {t: y_tr[:, [i]].astype(np.float32) for i, t in enumerate(task_names)})
    test = ArraySource(x_te.astype(np.float32),
                       {t: y_te[:, [i]].astype(np.float32) for i, t in enumerate(task_names)})
    return DataBundle(name=name, tasks=tasks, train=train, test=test,
                      input_shape=(x_tr.shape[1],), input_dtype="float32", meta=meta)


# --------------------------------------------------------------------------- MMoE


def mmoe_labels(x: np.ndarray, w: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Noise-free MMoE targets: ``z + sum_i sin(alpha_i z + beta_i)`` with ``z = x @ w.T``.

    ``x`` is [n, dim], ``w`` is [K, dim] (one row per task); returns float64 [n, K].
    """
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    alpha = np.asarray(alpha, np.float64)
    beta = np.asarray(beta, np.float64)
    return z + np.sin(z[..., None] * alpha + beta).sum(-1)


def mmoe_synthetic(n_train: int = 8000, n_test: int = 2000, dim: int = 100,
                   correlation: float = 0.5, num_sines: int = 10, noise: float = 0.01,
                   scale: float = 1.0, seed: int = 0, sine_seed: int | None = 0,
                   sines: str = "normal") -> DataBundle:
    """The MMoE paper's two-task regression data with task correlation ``p``.

    Construction (Ma et al., KDD 2018):

    * ``u1, u2``: orthonormal vectors in R^dim (QR of a Gaussian dim x 2 matrix);
    * ``w1 = scale * u1``, ``w2 = scale * (p u1 + sqrt(1 - p^2) u2)``, so
      ``cos(w1, w2) = p`` exactly and both have norm ``scale``;
    * ``alpha_i, beta_i ~ N(0, 1)``, i = 1..num_sines, shared by both tasks. The paper
      calls them "given parameters" and does not give their values, so they are drawn
      from their own stream ``default_rng([sine_seed, 3])``: with the default
      ``sine_seed=0`` every ``seed`` gets the *same* label function and a seed changes
      only ``u``, the samples, the noise (and, in training, the initialisation).
      ``sine_seed=None`` draws them from ``seed``'s parameter stream instead (the
      generator before 2026-11: each seed a different function, with label variance
      1.3-2.8 and label correlation at p=0.5 from 0.11 to 0.49 over seeds 0-2);
    * ``sines="integer"`` instead fixes ``alpha_i = i`` and ``beta_i = (i - 1)^2``
      (i = 1..num_sines), the values Google Research's public generator for this
      procedure chose, also noting that the paper gives none: a far more oscillating label
      function than ``N(0, 1)`` draws (``sine_seed`` is then unused);
    * ``x ~ N(0, I_dim)``; ``y_k = w_k.x + sum_i sin(alpha_i w_k.x + beta_i) + eps_k``,
      ``eps_k ~ N(0, noise)``.

    ``noise`` is the *variance* of eps, reading the paper's ``N(0, 0.01)`` as
    ``N(mean, variance)`` (``meta["noise_std"] = sqrt(noise)``; either reading is tiny
    next to the label variance). Because ``x`` is isotropic, ``u`` does not change how
    hard the problem is; ``alpha, beta`` do, and they set the label mean
    ``sum_i sin(beta_i) exp(-alpha_i^2 scale^2 / 2)``. With the default ``sine_seed`` the
    Pearson correlation of the two labels is ~0.22 / 0.44 / 0.78 / 1.0 at
    p = 0.5 / 0.7 / 0.9 / 1.0, label variance ~3.1, label mean ~-3.2 (400k samples).
    Train and test share ``w, alpha, beta``;
    test inputs are drawn fresh. Inputs float32 [n, dim]; tasks ``"task1"``,
    ``"task2"`` (regression, dim 1, labels float32 [n, 1]); nothing is standardised.
    ``meta`` holds ``u`` [2, dim], ``w`` [2, dim], ``alpha``, ``beta`` and the knobs.
    """
    n_train = _check_count("n_train", n_train, 1)
    n_test = _check_count("n_test", n_test, 1)
    dim = _check_count("dim (needs two orthogonal directions)", dim, 2)
    p = _check_real("correlation", correlation, -1.0, 1.0)
    num_sines = _check_count("num_sines", num_sines, 0)
    noise = _check_real("noise (variance of eps)", noise, 0.0)
    scale = _check_real("scale", scale)
    if scale == 0.0:
        raise ValueError("scale must be non-zero (it is the norm of w1 and w2), got 0.0")
    if sine_seed is not None:
        sine_seed = _check_count("sine_seed (or None for per-seed sines)", sine_seed, 0)
    if sines not in ("normal", "integer"):
        raise ValueError(f"sines must be 'normal' (alpha, beta ~ N(0, 1)) or 'integer' (alpha_i = i,"
                         f" beta_i = (i-1)^2); got {sines!r}")

    rng_params, rng_train, rng_test = _streams(seed)
    q, r = np.linalg.qr(rng_params.standard_normal((dim, 2)))
    u = (q * np.sign(np.diag(r))).T  # [2, dim]; sign-fixed, i.e. Gram-Schmidt
    w = scale * np.stack([u[0], p * u[0] + math.sqrt(1.0 - p * p) * u[1]])
    if sine_seed is None:
        rng_sines = rng_params
    else:
        rng_sines = np.random.default_rng([sine_seed, 3])
    alpha = rng_sines.standard_normal(num_sines)
    beta = rng_sines.standard_normal(num_sines)
    if sines == "integer":
        alpha = np.arange(1, num_sines + 1, dtype=np.float64)
        beta = np.arange(num_sines, dtype=np.float64) ** 2
    noise_std = math.sqrt(noise)

    def split(rng, n):
        x = rng.standard_normal((n, dim))
        y = mmoe_labels(x, w, alpha, beta) + noise_std * rng.standard_normal((n, 2))
        return x, y

    (x_tr, y_tr), (x_te, y_te) = split(rng_train, n_train), split(rng_test, n_test)
    meta = dict(generator="mmoe_synthetic", correlation=p, scale=scale, num_sines=num_sines,
                noise=noise, noise_std=noise_std, seed=int(seed),
                sine_seed=sine_seed, sines=sines, u=u, w=w,
                alpha=alpha, beta=beta)
    return _regression_bundle("mmoe_synthetic", ["task1", "task2"], (x_tr, x_te),
                              (y_tr, y_te), meta)


# ----------------------------------------------------------------------- MultiTab


def equicorrelation(num_tasks: int, rho: float) -> np.ndarray:
    """``P = (1 - rho) I + rho 11^T``: unit diagonal, every off-diagonal entry ``rho``."""
    return (1.0 - rho) * np.eye(num_tasks) + rho * np.ones((num_tasks, num_tasks))


def equicorrelation_sqrt(num_tasks: int, rho: float) -> np.ndarray:
    """The symmetric PSD square root of ``equicorrelation(num_tasks, rho)``, in closed form.

    ``P`` has eigenvalue ``1 + (T-1) rho`` on ``1/sqrt(T)`` and ``1 - rho`` on its
    orthogonal complement, so ``P^1/2 = sqrt(1-rho) I + (sqrt(1+(T-1)rho) - sqrt(1-rho))/T 11^T``.
    Unlike ``V Lambda^1/2`` from ``eigh`` this does not depend on the eigenvector
    signs LAPACK happens to return, so W is reproducible across machines.
    """
    a = math.sqrt(max(1.0 - rho, 0.0))
    b = math.sqrt(max(1.0 + (num_tasks - 1) * rho, 0.0))
    return a * np.eye(num_tasks) + (b - a) / num_tasks * np.ones((num_tasks, num_tasks))


def multitab_labels(x: np.ndarray, w: np.ndarray, degrees: Sequence[int]) -> np.ndarray:
    """Noise-free MultiTab targets: ``y_t = sum_{k=1..d_t} z_t^k`` with ``z = x @ w.T``.

    Returns float64 [n, T].
    """
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    y = np.zeros_like(z)
    for t, d in enumerate(degrees):
        for k in range(1, int(d) + 1):
            y[:, t] += z[:, t] ** k
    return y


def multitab_synthetic(num_tasks: int = 3, n_train: int = 4000, n_test: int = 2000,
                       dim: int = 32, correlation: float = 0.5,
                       degrees: Sequence[int] | None = None, noise: float = 0.1,
                       seed: int = 0) -> DataBundle:
    """MultiTab-Bench style regression: ``T`` tasks with pairwise weight cosine ``rho``.

    Construction:

    * ``U`` [T, dim]: Gram-Schmidt of T Gaussian vectors in R^dim (orthonormal rows);
    * ``P = (1 - rho) I + rho 11^T`` and ``W = P^1/2 U`` with the symmetric square
      root ``P^1/2 = V Lambda^1/2 V^T``. Then ``W W^T = P^1/2 U U^T P^1/2 = P``: the
      rows of W are unit vectors with pairwise cosine exactly ``rho``. (The spec's
      ``V Lambda^1/2 U`` also gives ``W W^T = P``; the symmetric root is used because
      it does not depend on eigenvector signs.)
    * ``x ~ N(0, I_dim)``, ``z_t = x . w_t``,
      ``y_t = z_t + sum_{k=2..d_t} z_t^k + noise * eps``, ``eps ~ N(0, 1)``
      (``noise`` is the standard deviation sigma).

    ``degrees``: per-task polynomial degree ``d_t >= 1`` (default all 1, i.e. linear).
    ``correlation`` must lie in ``[-1/(T-1), 1]`` for P to be positive semi-definite.
    Tasks ``"t0".."t{T-1}"`` (regression, dim 1); inputs float32 [n, dim]; nothing is
    standardised (high degrees give heavy-tailed labels). Test inputs are drawn fresh
    with the same W. ``meta`` holds ``U``, ``W``, ``P``, ``degrees`` and the knobs.
    """
    num_tasks = _check_count("num_tasks", num_tasks, 1)
    n_train = _check_count("n_train", n_train, 1)
    n_test = _check_count("n_test", n_test, 1)
    dim = _check_count("dim", dim, 1)
    if dim < num_tasks:
        raise ValueError(f"dim must be >= num_tasks={num_tasks} (U needs {num_tasks} "
                         f"orthonormal rows in R^dim), got dim={dim}")
    rho_min = -1.0 / (num_tasks - 1) if num_tasks > 1 else -1.0
    rho = _check_real(f"correlation (for num_tasks={num_tasks} P is PSD only for "
                      f"rho in [{rho_min:.6g}, 1])", correlation, rho_min, 1.0)
    noise = _check_real("noise (standard deviation of eps)", noise, 0.0)
    if degrees is None:
        degrees = [1] * num_tasks
    degrees = list(degrees)
    if len(degrees) != num_tasks:
        raise ValueError(f"degrees must have one entry per task ({num_tasks}), got {degrees!r}")
    degrees = [_check_count(f"degrees[{i}]", d, 1) for i, d in enumerate(degrees)]

    rng_params, rng_train, rng_test = _streams(seed)
    q, r = np.linalg.qr(rng_params.standard_normal((dim, num_tasks)))
    u = (q * np.sign(np.diag(r))).T  # [T, dim]; sign-fixed QR == Gram-Schmidt
    p_mat = equicorrelation(num_tasks, rho)
    w = equicorrelation_sqrt(num_tasks, rho) @ u

    def split(rng, n):
        x = rng.standard_normal((n, dim))
        y = multitab_labels(x, w, degrees) + noise * rng.standard_normal((n, num_tasks))
        return x, y

    (x_tr, y_tr), (x_te, y_te) = split(rng_train, n_train), split(rng_test, n_test)
    meta = dict(generator="multitab_synthetic", correlation=rho, degrees=tuple(degrees),
                noise=noise, seed=int(seed), U=u, W=w, P=p_mat)
    return _regression_bundle("multitab_synthetic", [f"t{i}" for i in range(num_tasks)],
                              (x_tr, x_te), (y_tr, y_te), meta)
