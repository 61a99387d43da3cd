import pytest
import torch

from vidgen.sampling import (
    add_noise,
    classifier_free,
    euler_sample,
    sde_sample,
    time_grid,
    velocity_target,
)


def test_time_grid_runs_from_noise_to_data():
    grid = time_grid(8)
    assert grid.shape == (9,) and grid[0] == 1 and grid[-1] == 0
    assert (grid[1:] < grid[:-1]).all()
    shifted = time_grid(8, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0
    assert (shifted[1:-1] > grid[1:-1]).all()  # more steps spent at high noise
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)


def test_noise_path_endpoints_and_velocity():
    x0, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(add_noise(x0, eps, torch.zeros(2)), x0)
    assert torch.equal(add_noise(x0, eps, torch.ones(2)), eps)
    t = torch.tensor([0.3, 0.7])
    # d/dt of the path is the velocity target.
    h = 1e-3
    numeric = (add_noise(x0, eps, t + h) - add_noise(x0, eps, t)) / h
    torch.testing.assert_close(numeric, velocity_target(x0, eps), atol=1e-2, rtol=1e-2)


def test_euler_with_the_exact_velocity_recovers_the_data():
    x0 = torch.randn(4, 5)
    eps = torch.randn(4, 5)
    # On a straight path the true velocity is constant, so Euler is exact in any steps.
    out = euler_sample(lambda x, t: velocity_target(x0, eps), eps, time_grid(3, shift=2.0))
    torch.testing.assert_close(out, x0)
    # A denoiser that predicts nothing leaves the noise where it is.
    assert torch.equal(euler_sample(lambda x, t: torch.zeros_like(x), eps, time_grid(4)), eps)


def _gaussian_velocity(mu: float, sigma: float):
    """The exact flow velocity E[eps - x0 | x_t] for data x0 ~ N(mu, sigma^2)."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, *([1] * (x.ndim - 1))).double()
        var = (1 - t) ** 2 * sigma**2 + t**2  # of x_t
        centred = x.double() - (1 - t) * mu
        x0 = mu + (1 - t) * sigma**2 / var * centred
        eps = t / var * centred
        return (eps - x0).float()

    return velocity


def test_sde_sampler_with_the_exact_velocity_samples_the_data():
    mu, sigma = 1.5, 0.5
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(100_000, 1, generator=gen)
    velocity = _gaussian_velocity(mu, sigma)
    draws = lambda: torch.randn(noise.shape, generator=gen)  # noqa: E731
    out = sde_sample(velocity, noise, time_grid(200), eta=1.0, draws=draws)
    assert abs(out.mean().item() - mu) < 0.01
    assert abs(out.std().item() - sigma) < 0.01
    # A wrong start (noise twice too wide): the ODE carries the error to the data, the SDE
    # replaces the noise as it goes and forgets the error, the faster the larger eta.
    ode_error = abs(euler_sample(velocity, 2 * noise, time_grid(200)).std().item() - sigma)
    sde_error = {
        eta: abs(
            sde_sample(
                velocity,
                2 * noise,
                time_grid(200),
                eta=eta,
                draws=draws,
            )
            .std()
            .item()
            - sigma
        )
        for eta in (1.0, 2.0)
    }
    assert ode_error > 0.4
    assert sde_error[1.0] < 0.2 * ode_error
    assert sde_error[2.0] < 0.02


def test_sde_sampler_at_eta_0_is_euler_and_draws_from_the_source_given():
    x0, eps = torch.randn(4, 5), torch.randn(4, 5)
    denoiser = lambda x, t: velocity_target(x0, eps) * (1 + t[:, None])  # noqa: E731
    grid = time_grid(5, shift=2.0)
    assert torch.equal(sde_sample(denoiser, eps, grid, eta=0.0), euler_sample(denoiser, eps, grid))
    calls = []

    def draws() -> torch.Tensor:
        calls.append(1)
        return torch.zeros(4, 5)

    # With zero draws the result is deterministic but not Euler's: the drift correction acts.
    out = sde_sample(denoiser, eps, grid, eta=0.5, draws=draws)
    assert len(calls) == 4  # every step but the last, which adds no noise
    assert not torch.allclose(out, euler_sample(denoiser, eps, grid))
    for eta in (-0.1, float("nan"), 11.0):
        with pytest.raises(ValueError, match="eta must be"):
            sde_sample(denoiser, eps, grid, eta=eta)


def test_classifier_free_guidance():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert classifier_free(c, u, 1.0) == c
    assert classifier_free(c, u, 0.0) == u
    assert classifier_free(c, u, 3.0) == torch.tensor([4.0])


def test_time_grid_refuses_a_shift_that_makes_every_time_nan():
    for shift in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="shift must be"):
            time_grid(4, shift=shift)
    with pytest.raises(ValueError, match="steps must be an int"):
        time_grid(2.5)


def test_the_token_samplers_are_exported_where_the_readme_says():
    from vidgen.sampling import guide_logits, sample_tokens, top_k_filter, top_p_filter

    assert all(callable(f) for f in (guide_logits, sample_tokens, top_k_filter, top_p_filter))


def test_value_checks_are_made_only_where_they_cost_no_host_sync():
    """Range and NaN checks read values: free on the CPU, a host sync per denoising or block
    step on a GPU (a device with no values stands in for one here)."""
    from vidgen.sampling.tokens import sample_tokens
    from vidgen.validate import values_checkable

    assert values_checkable(torch.zeros(2))
    assert not values_checkable(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="logits hold NaN"):
        sample_tokens(torch.tensor([[0.0, float("nan")]]), None, 0.0)
