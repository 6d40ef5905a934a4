"""Optional peer check against LibMTL 1.1.5 on identical gradients (skipped
unless torch and LibMTL are installed: ``pip install --no-deps LibMTL==1.1.5``).

Of the wave-2 methods, LibMTL 1.1.5 (the PyPI release) has GLS, GradVac and
GradDrop; GradDrop draws its U with torch's generator, so only GLS and GradVac
are compared draw for draw here (GradDrop is checked against its expectation in
optim_jac_methods_test.py). Later LibMTL versions' methods are not on PyPI."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl.optim as mo

torch = pytest.importorskip("torch")
sys.modules.setdefault("torchvision.models.utils", torch.hub)
weighting = pytest.importorskip("LibMTL.weighting")
gradvac_module = sys.modules["LibMTL.weighting.GradVac"]


def _peer(cls, params):
    class Peer(cls):
        def __init__(self):
            super().__init__()
            self.task_num, self.device, self.rep_grad = T, torch.device("cpu"), False
            self._params = params

        def get_share_params(self):
            return self._params

        def zero_grad_share_params(self):
            for p in self._params:
                p.grad = None if p.grad is None else torch.zeros_like(p)

    return Peer()


T, P1, P2 = 4, (3, 2), (5,)


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(*P1, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(*P2, generator=g, dtype=torch.float64, requires_grad=True)]
    a = torch.randn(T, 4, 11, generator=g, dtype=torch.float64)
    b = torch.randn(T, 4, generator=g, dtype=torch.float64)

    def losses():
        theta = torch.cat([params[0].reshape(-1), params[1]])
        return 0.5 * ((a @ torch.tanh(theta) - b) ** 2).sum(1) + 0.1

    return params, losses


def _jacobian(params, losses):
    rows = []
    for t in range(T):
        gr = torch.autograd.grad(losses()[t], params)
        rows.append(torch.cat([x.reshape(-1) for x in gr]).detach().numpy())
    return np.stack(rows)


def _peer_direction(params):
    return np.concatenate([p.grad.detach().reshape(-1).numpy() for p in params])


@pytest.fixture(autouse=True)
def _float64_torch():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # LibMTL allocates its gradient buffers by default
    yield
    torch.set_default_dtype(old)


def test_gls_matches_libmtl():
    with jax.enable_x64(True):
        params, losses = _problem(0)
        jac = _jacobian(params, losses)
        ls = losses()
        peer = _peer(weighting.GLS, params)
        peer.backward(ls)
        w, _ = mo.gls().weights((), losses=jnp.asarray(ls.detach().numpy()))
        np.testing.assert_allclose(np.asarray(w) @ jac, _peer_direction(params), rtol=1e-10)


def test_gradvac_matches_libmtl(monkeypatch):
    """Same order (LibMTL's random.shuffle replaced by our permutation), EMA only
    on conflict as LibMTL does, β = 0.5, over several steps with a moving θ."""
    with jax.enable_x64(True):
        params, losses = _problem(1)
        peer = _peer(weighting.GradVac, params)
        agg = mo.gradvac(beta=0.5, ema_on_conflict_only=True)
        fn = jax.jit(agg.weights)
        state = agg.init(T)
        for step in range(5):
            key = jax.random.key(step)
            order = np.asarray(mo.pcgrad_order(key, T))
            calls = iter(range(T))

            def shuffle(lst, order=order, calls=calls):
                i = next(calls)
                lst[:] = [int(j) for j in order[i] if j != i]

            monkeypatch.setattr(gradvac_module.random, "shuffle", shuffle)
            jac = _jacobian(params, losses)
            for p in params:
                p.grad = None
            peer.backward(losses(), beta=0.5)
            w, state = fn(state, gram=jnp.asarray(jac @ jac.T), key=key)
            ref = _peer_direction(params)
            np.testing.assert_allclose(np.asarray(w) @ jac, ref, rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(np.asarray(state), peer.rho_T.numpy(), rtol=1e-6,
                                       atol=1e-9)
            with torch.no_grad():  # move θ so the next step's gradients differ
                for p in params:
                    p -= 0.3 * p.grad
