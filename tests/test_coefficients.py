"""Host-side float64 coefficients: golden values, partition of unity, classical AB weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deis_jax.sampling import coefficients as coef
from deis_jax.sampling.sde import VESDE, VPSDE, DiscreteVPSDE, SubVPSDE
from deis_jax.sampling.timesteps import time_grid

pytestmark = pytest.mark.numerics  # coefficients against exact tables and closed forms

VP = VPSDE.linear(0.1, 20.0)
TS10 = time_grid(VP, 10, "quadratic", t0=1e-3)


def test_tab3_coefficients_match_the_exact_table():
    # deis.md §2.3: Gauss-Legendre (64 nodes in rho) float64 values, VP 0.1/20, N = 10.
    expected = {
        0: [-4.333956, 0, 0, 0],
        1: [-3.1958592, 0.8188595, 0, 0],
        2: [-2.2201687, 1.1831595, -0.3245755, 0],
        3: [-1.5387334, 1.2236740, -0.6328197, 0.1285664],
        9: [-0.0800698, 0.0335713, -0.0105326, 0.0014195],
    }
    c = coef.polynomial_eps_coefficients(VP, TS10, 3, basis="t")
    for k, row in expected.items():
        np.testing.assert_allclose(c[k], row, atol=6e-8)
    # Unused history slots of the warm-up rows are exactly zero.
    assert c[0, 1:].tolist() == [0, 0, 0] and c[1, 2:].tolist() == [0, 0] and c[2, 3] == 0


def test_ddim_coefficients_and_psi():
    psi, c = coef.ddim_coefficients(VP, TS10)
    np.testing.assert_allclose(
        psi, [5.3334567, 3.3720627, 2.3390085, 1.7613968, 1.4249901, 1.2255632, 1.1088397,
              1.0443618, 1.0132634, 1.0021272], atol=5e-8)  # fmt: skip
    np.testing.assert_allclose(
        c, [-4.33395595, -2.3769997, -1.36158467, -0.81931266, -0.52454304, -0.3563585,
            -0.25045565, -0.17384797, -0.11026172, -0.05561167], atol=5e-9)  # fmt: skip
    # sigma_{k+1} - psi_k sigma_k, the textbook DDIM form.
    np.testing.assert_allclose(c, VP.sigma(TS10[1:]) - psi * VP.sigma(TS10[:-1]), rtol=1e-13)


SCHEDULES = {
    "vp": (VP, 1e-3),
    "cosine": (VPSDE.cosine(), 1e-3),
    "subvp": (SubVPSDE(), 1e-3),
    "ve": (VESDE(), 1e-5),
    "discrete": (DiscreteVPSDE.linear(), None),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("basis", ["t", "rho"])
@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_rows_sum_to_the_ddim_coefficient(name, basis, order):
    schedule, t0 = SCHEDULES[name]
    ts = time_grid(schedule, 12, "quadratic", t0=t0)
    c = coef.polynomial_eps_coefficients(schedule, ts, order, basis=basis)
    _, ddim = coef.ddim_coefficients(schedule, ts)
    np.testing.assert_allclose(c.sum(axis=1), ddim, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(c[0, 0], ddim[0], rtol=1e-13)  # the first row is DDIM
    if order == 0:
        np.testing.assert_allclose(c[:, 0], ddim, rtol=1e-13)


def _uniform_rho_grid(schedule, n, t0=1e-3):
    rhos = np.linspace(schedule.rho(1.0), schedule.rho(t0), n + 1)
    ts = schedule.t_from_rho(rhos)
    ts[0], ts[-1] = 1.0, t0
    return ts, rhos[1] - rhos[0]


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_rhoab_on_a_uniform_rho_grid_is_classical_adams_bashforth(order):
    ts, h = _uniform_rho_grid(VP, 12)
    d = (
        coef.polynomial_eps_coefficients(VP, ts, order, basis="rho")
        / (VP.alpha(ts[1:]) * h)[:, None]
    )
    for k in range(12):
        q = min(k, order)
        np.testing.assert_allclose(d[k, : q + 1], coef.ADAMS_BASHFORTH[q], rtol=1e-12)
    # iPNDM's fixed weights coincide with rhoAB there.
    ipndm = coef.adams_bashforth_eps_coefficients(VP, ts, order)
    rhoab = coef.polynomial_eps_coefficients(VP, ts, order, basis="rho")
    np.testing.assert_allclose(ipndm, rhoab, rtol=1e-11, atol=1e-13)


def test_rhoab_order1_closed_form_on_a_nonuniform_grid():
    rho = VP.rho(TS10)
    c = coef.polynomial_eps_coefficients(VP, TS10, 1, basis="rho")
    for k in range(1, 10):
        h, hp = rho[k + 1] - rho[k], rho[k] - rho[k - 1]
        expected = VP.alpha(TS10[k + 1]) * np.array([h + h**2 / (2 * hp), -(h**2) / (2 * hp)])
        np.testing.assert_allclose(c[k], expected, rtol=1e-12)


def test_quadrature_is_converged():
    c64 = coef.polynomial_eps_coefficients(VP, TS10, 3, num_nodes=64)
    c128 = coef.polynomial_eps_coefficients(VP, TS10, 3, num_nodes=128)
    np.testing.assert_allclose(c64, c128, rtol=1e-12, atol=1e-14)


def test_coefficients_are_differentiable_in_the_grid():
    # The same code traced with jax.numpy under x64: gradients for grid optimisation.
    grid = time_grid(VP, 5, "quadratic", t0=1e-3)
    ts = jnp.asarray(grid)

    @jax.jit
    def last_coefficient(inner):
        full = jnp.concatenate([ts[:1], inner, ts[-1:]])
        return coef.polynomial_eps_coefficients(VP, full, 3)[-1, 0]

    inner = ts[1:-1]
    grad = jax.jit(jax.grad(last_coefficient))(inner)
    step = 1e-7
    bump = inner.at[-1].add(step)
    fd = (last_coefficient(bump) - last_coefficient(inner.at[-1].add(-step))) / (2 * step)
    np.testing.assert_allclose(grad[-1], fd, rtol=1e-6)
    host = coef.polynomial_eps_coefficients(VP, grid, 3)[-1, 0]
    np.testing.assert_allclose(last_coefficient(inner), host, rtol=1e-14)


def test_rk_tableaus_are_consistent():
    for name in coef.RK_TABLEAUS:
        c, a, b = coef.rk_tableau(name)
        np.testing.assert_allclose(b.sum(), 1.0)
        np.testing.assert_allclose(a.sum(axis=1), c)  # row-sum condition
        assert np.all(np.triu(a) == 0)  # explicit
    assert coef.rk_tableau("3kutta")[0].tolist() == [0, 0.5, 1]
    with pytest.raises(ValueError, match="tableau must be one of"):
        coef.rk_tableau("midpoint")
