"""Fast mode is calibrated against exact mode (Eq. 20): at the same m both take steps of the same size.

The diffusion model here IS the optimal denoiser for Gaussian data x0 ~ N(0, sigma_data^2 I),
E[x0 | x] = a sigma_data^2 / (a^2 sigma_data^2 + sigma^2) x for x = a x0 + sigma n (a = 1, or
1 - sigma for flow models), written out below and turned into what each parametrisation's
network outputs. For it, exact mode's gradient through the denoiser is the true grad_x R,
so fast mode's steps must match it at every sigma, and would not without its d x0/d x factor.
"""

import comfy.sample
import pytest
import torch
import torch.nn.functional as F
from support.host_support import sd15_conditioning, tiny_sd15, tiny_vae

STEPS = 20
CFG = 4.0


class GaussianOptimalNetwork(torch.nn.Module):
    """The network output whose denoised prediction is E[x0 | x] for x0 ~ N(0, sigma_data^2 I).

    ComfyUI feeds the network calculate_input(sigma, x) (x / sqrt(sigma^2 + sigma_data^2) for
    eps and v models, x for flow) and the timestep; sigma comes back from model_sampling.
    """

    def __init__(self, base_model, parametrisation: str):
        super().__init__()
        self._base = [base_model]  # not a submodule
        self.parametrisation = parametrisation
        self.dtype = torch.float32

    def forward(self, xc, t, **kwargs):
        sampling = self._base[0].model_sampling
        sigma = sampling.sigma(t).view(-1, 1, 1, 1)
        sd = float(sampling.sigma_data) if hasattr(sampling, "sigma_data") else 1.0
        flow = self.parametrisation == "flow"
        x = xc if flow else xc * (sigma**2 + sd**2) ** 0.5
        a = 1 - sigma if flow else torch.ones_like(sigma)
        denoised = a * sd**2 / (a**2 * sd**2 + sigma**2) * x  # Cov(x0, x) / Var(x) * x
        if self.parametrisation == "v":  # V_PREDICTION.calculate_denoised, solved for the output
            return (x * sd**2 / (sigma**2 + sd**2) - denoised) * (sigma**2 + sd**2) ** 0.5 / (sigma * sd)
        return (x - denoised) / sigma  # EPS and CONST: denoised = x - output * sigma


def gaussian_model(parametrisation: str):
    import comfy.model_sampling

    model = tiny_sd15()
    if parametrisation != "eps":
        if parametrisation == "flow":
            class Sampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
                pass
            sampling = Sampling(model.model.model_config)
            sampling.set_parameters(shift=1.0, multiplier=1000)
        else:
            class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
                pass
            sampling = Sampling(model.model.model_config)
            sampling.sigma_data = 0.5  # as an EDM-style model declares it
        model.add_object_patch("model_sampling", sampling)
    model.model.diffusion_model = GaussianOptimalNetwork(model.model, parametrisation)
    return model


def corrections(pack, model, vae, encoders, mode):
    """{step: D' - D} of a guided 20-step Euler run (a post-CFG function after the hook sees D')."""
    from plora_pack.plora_core.scores import embed_references

    clip, _ = encoders
    generator = torch.Generator().manual_seed(7)
    refs = embed_references(clip, None, torch.rand(1, 3, 24, 24, generator=generator),
                            torch.rand(1, 3, 32, 32, generator=generator))
    sigmas = pack.glue.host.schedule_sigmas(model, STEPS, "euler", "normal", 1.0)
    # the CLIP terms only: any R will do here, and it is quicker
    settings = pack.glue.guidance.GuidanceSettings(vae, clip, None, refs, (1.0, 1.0, 0.0), 10.0, mode)
    guided, hooks = pack.glue.guidance.install_guidance(model, settings, at_run_time=False)
    seen = []

    def after_the_hook(args):
        plain = args["uncond_denoised"] + CFG * (args["cond_denoised"] - args["uncond_denoised"])
        seen.append((float(args["sigma"].max()), args["denoised"] - plain))
        return args["denoised"]

    guided.set_model_sampler_post_cfg_function(after_the_hook)
    latent = torch.zeros(1, 4, 8, 8)
    with hooks.run(guided, sigmas, "euler", CFG) as run:
        comfy.sample.sample(guided, comfy.sample.prepare_noise(latent, 5), STEPS, CFG, "euler", "normal",
                            sd15_conditioning(seed=1), sd15_conditioning(seed=2), latent, seed=5, disable_pbar=True)
    assert run.sigma_data == float(getattr(model.get_model_object("model_sampling"), "sigma_data", 1.0))
    assert len(seen) == STEPS and len(run.record.rows) == STEPS and run.record.fast_fallbacks == 0
    return [(sigma, shift) for sigma, shift in seen]


def agreement(fast, exact):
    """Per step: (sigma, |fast| / |exact|, cosine); None where both are zero (sigma 1 of a flow model: D = 0)."""
    rows = []
    for (sigma, a), (_, b) in zip(fast, exact):
        if b.norm() == 0 and a.norm() < 1e-12:
            rows.append((sigma, None, None))
            continue
        rows.append((sigma, float(a.norm() / b.norm()), float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))))
    return rows


@pytest.mark.parametrize("parametrisation", ["eps", "v", "flow"])
def test_fast_and_exact_steps_agree_at_every_sigma(pack, encoders, parametrisation, monkeypatch):
    model, vae = gaussian_model(parametrisation), tiny_vae()
    exact = corrections(pack, model, vae, encoders, "exact")
    fast = corrections(pack, model, vae, encoders, "fast")
    rows = agreement(fast, exact)
    assert sum(ratio is not None for _, ratio, _ in rows) >= STEPS - 1
    for sigma, ratio, cosine in rows:
        if ratio is not None:
            assert abs(ratio - 1) < 0.05 and cosine > 0.99, (sigma, ratio, cosine)

    if parametrisation != "eps":
        return
    # without d x0_hat / d x_t (fast = grad w.r.t. x0_hat alone) the early steps are far too strong
    monkeypatch.setattr(pack.glue.guidance, "denoiser_jacobian", lambda *args, **kwargs: 1.0)
    uncalibrated = agreement(corrections(pack, model, vae, encoders, "fast"), exact)
    ratios = [ratio for _, ratio, _ in uncalibrated if ratio is not None]
    assert ratios[0] > 20 and sum(abs(r - 1) > 0.05 for r in ratios) >= STEPS // 2
