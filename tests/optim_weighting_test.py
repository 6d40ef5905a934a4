"""Loss-weighting methods against hand-worked numbers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl.optim as mo


def _run(agg, calls, num_tasks=2):
    """Feed a sequence of kwargs dicts to a jitted `weights`; return the weights."""
    fn = jax.jit(agg.weights)
    state = agg.init(num_tasks)
    out = []
    for kw in calls:
        kw = {k: (jnp.asarray(v) if k != "key" else v) for k, v in kw.items()}
        w, state = fn(state, **kw)
        out.append(np.asarray(w))
    return out, state


def test_ew():
    (w,), _ = _run(mo.ew(), [dict(losses=[3.0, 1.0, 2.0])], 3)
    np.testing.assert_array_equal(w, [1, 1, 1])
    (w,), _ = _run(mo.ew(), [dict(losses=[3.0, 1.0, 2.0], present=[True, False, True])], 3)
    np.testing.assert_array_equal(w, [1, 0, 1])


def test_rlw_sums_to_one_and_varies_with_key():
    agg = mo.rlw()
    fn = jax.jit(agg.weights)
    ws = [np.asarray(fn((), losses=jnp.ones(4), key=jax.random.key(i))[0]) for i in range(5)]
    for w in ws:
        assert abs(w.sum() - 1) < 1e-6 and (w > 0).all()
    assert len({tuple(np.round(w, 6)) for w in ws}) == 5
    again = np.asarray(fn((), losses=jnp.ones(4), key=jax.random.key(0))[0])
    np.testing.assert_array_equal(again, ws[0])
    w, _ = fn((), losses=jnp.ones(4), key=jax.random.key(0), present=jnp.array([1, 0, 1, 0], bool))
    assert w[1] == 0 and w[3] == 0 and abs(float(w.sum()) - 1) < 1e-6
    with pytest.raises(ValueError, match="key"):
        agg.weights((), losses=jnp.ones(4))


def test_uw_hand_worked_sgd():
    agg = mo.uw(lr=0.1, optimizer="sgd")
    (w0, w1), (s, _) = _run(agg, [dict(losses=[2.0, 0.5]), dict(losses=[2.0, 0.5])])
    np.testing.assert_allclose(w0, [1.0, 1.0])
    # ∂/∂s (e^{−s}L + s) = 1 − e^{−s}L = (−1, 0.5) at s = 0  ->  s = (0.1, −0.05)
    np.testing.assert_allclose(w1, [math.exp(-0.1), math.exp(0.05)], rtol=1e-6)
    g = (1 - np.exp([-0.1, 0.05]) * [2.0, 0.5])
    np.testing.assert_allclose(s, np.array([0.1, -0.05]) - 0.1 * g, rtol=1e-6)


def test_uw_gradient_is_that_of_its_objective():
    s = jnp.array([0.3, -0.2, 0.0])
    losses = jnp.array([1.5, 0.2, 3.0])
    auto = jax.grad(mo.uw_objective)(s, losses)
    agg = mo.uw(lr=1.0, optimizer="sgd")
    _, (s_new, _) = agg.weights((s, agg.init(3)[1]), losses=losses)
    np.testing.assert_allclose(s - s_new, auto, rtol=1e-6)


def test_uw_adam_first_step_and_absent_task():
    agg = mo.uw()  # Adam, lr 1e-2: first step is −lr·sign(grad)
    _, (s, _) = _run(agg, [dict(losses=[2.0, 0.5, 9.0], present=[True, True, False])], 3)
    np.testing.assert_allclose(s, [0.01, -0.01, 0.0], atol=1e-6)


def test_dwa_hand_worked():
    calls = [dict(losses=[1.0, 1.0]), dict(losses=[0.5, 1.0]), dict(losses=[0.5, 0.25]),
             dict(losses=[0.1, 0.1])]
    ws, _ = _run(mo.dwa(), calls)
    np.testing.assert_allclose(ws[0], [1, 1])
    np.testing.assert_allclose(ws[1], [1, 1])
    # step 2: r = L(1)/L(0) = (0.5, 1); w = 2·softmax(r/2) = 2·(e^.25, e^.5)/(e^.25 + e^.5)
    e = np.exp([0.25, 0.5])
    np.testing.assert_allclose(ws[2], 2 * e / e.sum(), rtol=1e-6)
    # step 3: r = L(2)/L(1) = (1, 0.25)
    e = np.exp([0.5, 0.125])
    np.testing.assert_allclose(ws[3], 2 * e / e.sum(), rtol=1e-6)


def test_dwa_per_epoch_period():
    # period 2: epoch means (1, 1), (0.5, 2); weights constant within an epoch
    calls = [dict(losses=[1.0, 1.0])] * 2 + [dict(losses=[0.5, 1.0]), dict(losses=[0.5, 3.0])] \
        + [dict(losses=[7.0, 7.0])] * 2
    ws, _ = _run(mo.dwa(period=2), calls)
    for w in ws[:4]:
        np.testing.assert_allclose(w, [1, 1])
    e = np.exp(np.array([0.5, 2.0]) / 2)
    np.testing.assert_allclose(ws[4], 2 * e / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(ws[5], ws[4])


def test_gradnorm_hand_worked_sgd():
    gram = [[4.0, 0.0], [0.0, 1.0]]  # ‖g‖ = (2, 1)
    agg = mo.gradnorm(alpha=1.5, lr=0.1, optimizer="sgd")
    ws, (w_next, *_) = _run(agg, [dict(gram=gram, losses=[1.0, 1.0]),
                                  dict(gram=gram, losses=[0.5, 1.0])])
    np.testing.assert_allclose(ws[0], [1, 1])
    # step 0: w‖g‖ = (2, 1), mean 1.5, r = (1, 1): target 1.5 -> grad sign (+,−)·‖g‖ = (2, −1)
    w1 = np.array([1 - 0.1 * 2, 1 + 0.1 * 1])
    w1 = 2 * w1 / w1.sum()
    np.testing.assert_allclose(ws[1], w1, rtol=1e-6)
    # step 1: L̃ = (0.5, 1), r = (2/3, 4/3); w‖g‖ = (2 w1_0, w1_1)
    gw = w1 * [2, 1]
    target = gw.mean() * np.array([2 / 3, 4 / 3]) ** 1.5
    grad = np.sign(gw - target) * [2, 1]
    w2 = w1 - 0.1 * grad
    np.testing.assert_allclose(w_next, 2 * w2 / w2.sum(), rtol=1e-6)


def test_gradnorm_grad_matches_autodiff():
    w = jnp.array([0.7, 1.1, 1.2])
    jac = jnp.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]])
    gram = jac @ jac.T
    losses, l0 = jnp.array([0.4, 0.9, 0.3]), jnp.array([1.0, 1.0, 0.5])

    def loss(w):  # the paper's L_grad with the target detached
        gw = w * jnp.linalg.norm(jac, axis=1)
        lt = losses / l0
        target = jax.lax.stop_gradient(gw.mean() * (lt / lt.mean()) ** 1.5)
        return jnp.sum(jnp.abs(gw - target))

    np.testing.assert_allclose(mo.gradnorm_grad(w, gram, losses, l0, 1.5), jax.grad(loss)(w),
                               rtol=1e-6)


def test_famo_hand_worked_sgd():
    agg = mo.famo(lr=1.0, gamma=0.0, optimizer="sgd")
    assert agg.post_step
    state = agg.init(2)
    w, state = jax.jit(agg.weights)(state, losses=jnp.array([1.0, 2.0]))
    # z = (½, ½); w ∝ z/L = (½, ¼) -> (2/3, 1/3)
    np.testing.assert_allclose(w, [2 / 3, 1 / 3], rtol=1e-6)
    state = jax.jit(agg.update)(state, losses=jnp.array([0.5, 2.0]))
    # δ = log L_before − log L_after = (log 2, 0); ∂zᵀδ/∂ξ = z(δ − zᵀδ) = (¼ log 2, −¼ log 2)
    np.testing.assert_allclose(state[0], [-0.25 * math.log(2), 0.25 * math.log(2)], rtol=1e-5)
    w, _ = agg.weights(state, losses=jnp.array([1.0, 1.0]))
    z = np.exp(np.asarray(state[0]))
    np.testing.assert_allclose(w, z / z.sum(), rtol=1e-6)
    assert w[0] < w[1]  # the task that improved more gets less weight


def test_famo_adam_with_weight_decay_matches_torch_semantics():
    # torch Adam(weight_decay=γ) adds γξ to the gradient; at ξ = 0 the first
    # Adam step is −lr·sign(grad)
    agg = mo.famo()
    state = agg.init(3)
    _, state = agg.weights(state, losses=jnp.array([1.0, 1.0, 1.0]))
    state = agg.update(state, losses=jnp.array([0.5, 1.0, 2.0]))
    np.testing.assert_allclose(state[0], [-0.025, 0.0, 0.025], atol=1e-6)


def test_famo_update_ignores_nonfinite_losses():
    agg = mo.famo()
    state = agg.init(2)
    _, state = agg.weights(state, losses=jnp.array([1.0, 2.0]))
    new = agg.update(state, losses=jnp.array([jnp.nan, 1.0]))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
