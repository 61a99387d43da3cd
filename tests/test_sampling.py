import pytest
import torch

from vidgen.sampling import add_noise, classifier_free, euler_sample, time_grid, velocity_target


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
