import math

import pytest
import torch

from plora_pack.plora_core.guidance import (ANCESTRAL, ANCESTRAL_RF, EULER, HEUN, HEUNPP2, SAMPLER_UNITS, SDE,
                                            VP_UNITS, X0, GuidanceWindow, SamplerStep, StepCounter, denoiser_jacobian,
                                            guided_denoised, sampler_step, shrink_latent, unit_scale,
                                            update_coefficient)


def test_units_sampler_is_the_identity_and_vp_converts_eps_models_only():
    assert unit_scale(SAMPLER_UNITS, 14.6, 10.0, False) == 1.0
    assert math.isclose(unit_scale(VP_UNITS, 3.0, 1.0, False), math.sqrt(2.0) * math.sqrt(10.0))
    assert unit_scale(VP_UNITS, 0.7, 0.4, True) == 1.0
    with pytest.raises(ValueError, match="guidance_units"):
        unit_scale("ve", 1.0, 0.5, False)


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
@pytest.mark.parametrize("sigma", [0.05, 0.3, 0.7, 0.95, 3.0, 14.6])
def test_denoiser_jacobian_is_the_regression_of_x0_on_x_for_gaussian_data(flow, sigma_data, sigma):
    """E[x0 | x] for x0 ~ N(0, sigma_data^2) is linear in x; its slope is Cov(x0, x) / Var(x), sampled here."""
    if flow and sigma >= 1:
        pytest.skip("flow sigmas lie in [0, 1]")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1_000_000, generator=generator, dtype=torch.float64) * sigma_data
    noise = torch.randn(1_000_000, generator=generator, dtype=torch.float64)
    x = ((1 - sigma) * x0 if flow else x0) + sigma * noise
    slope = float((x0 * x).mean() / (x * x).mean())
    standard_error = float(((x0 - slope * x) ** 2).mean().sqrt() / (x * x).mean().sqrt()) / len(x) ** 0.5
    assert abs(denoiser_jacobian(sigma, sigma_data, flow) - slope) < 5 * standard_error


def _x_next(update, x, d, s, s_next, flow, eta=1.0):
    """ComfyUI's step formulas (k_diffusion/sampling.py), deterministic part plus the RF rescale."""
    if s_next == 0:
        return d
    if update == EULER:  # sample_euler
        return x + (s_next - s) * (x - d) / s
    if update == ANCESTRAL or (update == ANCESTRAL_RF and not flow):  # get_ancestral_step
        up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        down = (s_next**2 - up**2) ** 0.5
        return x + (down - s) * (x - d) / s
    if update == ANCESTRAL_RF:  # sample_euler_ancestral_RF
        down = s_next * (1 + (s_next / s - 1) * eta)
        ratio = down / s
        return (1 - s_next) / (1 - down) * (ratio * x + (1 - ratio) * d)
    lam = (lambda v: math.log((1 - v) / v)) if flow else (lambda v: -math.log(v))
    alpha_next = (1 - s_next) if flow else 1.0
    h = lam(s_next) - lam(s)
    if update == SDE:  # sample_dpmpp_2m_sde, first order
        return s_next / s * math.exp(-h * eta) * x + alpha_next * -math.expm1(-h * (eta + 1)) * d
    if update == X0:  # sample_euler_cfg_pp: x = alpha_t * denoised + (terms of the uncond prediction)
        return alpha_next * d + 0.3 * x
    raise AssertionError(update)


@pytest.mark.parametrize("update", [EULER, ANCESTRAL, ANCESTRAL_RF, SDE, X0])
@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize(("s", "s_next"), [(0.9, 0.6), (0.5, 0.2), (0.3, 0.0)])
def test_update_coefficient_is_how_comfyui_steps_move_with_the_denoised(update, flow, s, s_next):
    scale = 1.0 if flow else 10.0
    s, s_next = s * scale, s_next * scale
    x, d, delta = 1.3, -0.4, 1e-3
    moved = (_x_next(update, x, d + delta, s, s_next, flow) - _x_next(update, x, d, s, s_next, flow)) / delta
    assert math.isclose(update_coefficient(update, s, s_next, flow), moved, rel_tol=1e-5)


def test_guided_denoised_moves_an_euler_step_by_minus_m_c_grad():
    x, denoised, sigma, sigma_next = torch.randn(5), torch.randn(5), 2.0, 0.5
    grad = torch.randn(5)

    def euler(d):
        return x + (sigma_next - sigma) * (x - d) / sigma

    for units in (SAMPLER_UNITS, VP_UNITS):
        c = unit_scale(units, sigma, sigma_next, False)
        guided = guided_denoised(denoised, grad, 10.0, c, update_coefficient(EULER, sigma, sigma_next, False))
        assert torch.allclose(euler(guided) - euler(denoised), -10.0 * c * grad, atol=1e-5)


def test_window_picks_steps_by_fraction_and_every_n():
    window = GuidanceWindow((10.0, 5.0, 2.0, 1.0, 0.5, 0.0), start=0.2, end=0.8, every=2)
    assert [s for s in range(window.steps) if window.is_guided(s)] == [1, 3]
    assert window.step_of(2.0) == 2 and window.step_of(3.0) is None and window.next_sigma(4) == 0.0
    assert window.step_of(2.0 * (1 + 1e-6)) == 2 and window.step_of(2.0 * (1 + 1e-4)) is None


def _calls(name, sigmas):
    """The sigmas at which ComfyUI's sampler evaluates the model, in order (k_diffusion/sampling.py)."""
    calls, end = [], sigmas[-1]
    for i in range(len(sigmas) - 1):
        calls.append(("start", i, sigmas[i]))
        if name == "heun" and sigmas[i + 1] != 0:
            calls.append(("corrector", i, sigmas[i + 1]))
        if name == "heunpp2" and sigmas[i + 1] != end:
            calls.append(("corrector", i, sigmas[i + 1]))
            if sigmas[i + 2] != end:
                calls.append(("corrector", i, sigmas[i + 2]))
        if name == "dpm_2" and sigmas[i + 1] != 0:
            calls.append(("mid", i, math.sqrt(sigmas[i] * sigmas[i + 1])))
    return calls


@pytest.mark.parametrize("name", ["euler", "heun", "heunpp2", "dpm_2"])
@pytest.mark.parametrize("sigmas", [(14.6, 6.0, 2.5, 1.0, 0.3, 0.0), (1.0, 0.7, 0.4, 0.1, 0.0), (5.0, 2.0, 0.0)])
def test_step_counter_finds_exactly_the_calls_that_start_a_step(name, sigmas):
    counter = StepCounter(GuidanceWindow(sigmas), sampler_step(name))
    starts = []
    for kind, step, sigma in _calls(name, sigmas):
        found = counter.observe(sigma)
        assert (found is not None) == (kind == "start"), (kind, step, sigma)
        if found is not None:
            starts.append(found)
    assert starts == list(range(len(sigmas) - 1))


def test_step_counter_handles_a_repeated_sigma_and_the_flow_snr_offset():
    counter = StepCounter(GuidanceWindow((3.0, 3.0, 1.0, 0.0)))
    assert [counter.observe(s) for s in (3.0, 3.0, 1.0, 1.0)] == [0, 1, 2, None]
    window = GuidanceWindow((1.0, 0.6, 0.0), first_sigma_alias=0.9999)
    counter = StepCounter(window, SamplerStep(SDE, snr_offset=True))
    assert [counter.observe(s) for s in (0.9999, 0.6)] == [0, 1]


def test_every_sampler_in_the_table_has_a_known_update_and_lookahead():
    assert sampler_step("euler_ancestral").update == ANCESTRAL_RF
    assert sampler_step("heun").lookahead == HEUN and sampler_step("heunpp2").lookahead == HEUNPP2
    assert sampler_step("a_sampler_from_2027") == SamplerStep()
    for step in (sampler_step(n) for n in ("exp_heun_2_x0", "exp_heun_2_x0_sde", "dpmpp_2m_sde", "er_sde")):
        assert step.snr_offset


def test_shrink_latent_keeps_aspect_and_gradient():
    latent = torch.randn(2, 4, 128, 96, requires_grad=True)
    small = shrink_latent(latent, 32)
    assert small.shape == (2, 4, 43, 32)
    small.sum().backward()
    assert (latent.grad != 0).all()
    assert shrink_latent(latent, None) is latent and shrink_latent(latent, 200) is latent
