import math

import torch

from plora_core.guidance import GuidanceWindow, denoised_correction, guided_denoised, shrink_latent, step_scale


def test_step_scale_converts_the_vp_step_to_ve_and_leaves_flow_alone():
    assert step_scale(0.0, 0.0, False) == 1.0
    assert math.isclose(step_scale(3.0, 1.0, False), math.sqrt(2.0) * math.sqrt(10.0))
    assert step_scale(0.7, 0.4, True) == 1.0


def test_denoised_correction_moves_an_euler_step_by_the_wanted_shift():
    x, denoised, sigma, sigma_next = torch.randn(5), torch.randn(5), 2.0, 0.5
    shift = torch.randn(5)

    def euler(d):
        return x + (sigma_next - sigma) * (x - d) / sigma

    moved = euler(denoised + denoised_correction(shift, sigma, sigma_next)) - euler(denoised)
    assert torch.allclose(moved, shift, atol=1e-6)
    grad = torch.randn(5)
    guided = guided_denoised(denoised, grad, 10.0, sigma, sigma_next, False)
    expected = -10.0 * step_scale(sigma, sigma_next, False) * grad
    assert torch.allclose(euler(guided) - euler(denoised), expected, atol=1e-5)


def test_window_picks_steps_by_fraction_and_every_n():
    window = GuidanceWindow((10.0, 5.0, 2.0, 1.0, 0.5, 0.0), start=0.2, end=0.8, every=2)
    assert [s for s in range(window.steps) if window.is_guided(s)] == [1, 3]
    assert window.step_of(2.0) == 2 and window.step_of(3.0) is None and window.next_sigma(4) == 0.0


def test_shrink_latent_keeps_aspect_and_gradient():
    latent = torch.randn(2, 4, 128, 96, requires_grad=True)
    small = shrink_latent(latent, 32)
    assert small.shape == (2, 4, 43, 32)
    small.sum().backward()
    assert (latent.grad != 0).all()
    assert shrink_latent(latent, None) is latent and shrink_latent(latent, 200) is latent
