"""PLoRAMetricGuidance: a guided MODEL that any sampler node runs; each run's sigmas and sampler read at run time.

The oracle for the run-time sampler detection is the one of test_guidance_samplers.py, written
without the pack: R of Eq. 16-19 on the CFG denoiser's output, differentiated by autograd with
respect to the sampler's x. Under SamplerCustomAdvanced with KSamplerSelect's Euler and ancestral
Euler the guided x_next must be x_next(plain) - m * that gradient.
"""

import logging

import comfy.sample
import comfy.samplers
import pytest
import torch
from support.host_support import sd15_conditioning, tiny_sd15, tiny_vae
from test_guidance_samplers import CFG, STEPS, flow_model, grad_x



@pytest.fixture
def references():
    """(subject, style) as ComfyUI IMAGEs [B, H, W, C], as the node receives them."""
    generator = torch.Generator().manual_seed(7)
    return torch.rand(1, 24, 24, 3, generator=generator), torch.rand(1, 40, 32, 3, generator=generator)


def custom_sampling():
    return pytest.importorskip("comfy_extras.nodes_custom_sampler",
                               reason="SamplerCustomAdvanced needs a full ComfyUI checkout (COMFYUI_PATH)")


def guided_model(pack, model, vae, encoders, references, m=10.0, mode="fast", start=0.0, end=1.0, every=1):
    clip, dino = encoders
    return pack.nodes.PLoRAMetricGuidance().patch(
        model=model, vae=vae, subject_reference=references[0], style_reference=references[1], clip_encoder=clip,
        guidance_scale=m, clip_subject_weight=1.0, clip_style_weight=1.0, dino_style_weight=1.0, gradient_mode=mode,
        guidance_start=start, guidance_end=end, guide_every=every, dino_encoder=dino)[0]


def recording(model, calls: list):
    """A clone whose post-CFG function (after any guidance) records the x of every model call."""
    recorder = model.clone()
    recorder.set_model_sampler_post_cfg_function(lambda args: calls.append(args["input"].clone()) or args["denoised"])
    return recorder


def sample(model, sampler="euler", steps=STEPS, seed=3, cfg=CFG):
    latent = torch.zeros(1, 4, 8, 8)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, cfg, sampler, "normal",
                               sd15_conditioning(seed=1), sd15_conditioning(seed=2), latent, seed=seed,
                               disable_pbar=True)


def logged_runs(caplog) -> list[tuple[str, list[int]]]:
    """(header, guided steps) of every run the guided MODEL logged."""
    runs = []
    for record in caplog.records:
        text = record.getMessage()
        if text.startswith("P-LoRA guidance ("):
            header, *lines = text.splitlines()
            runs.append((header, [int(line.split()[1]) for line in lines if line.startswith("step")]))
    return runs


def test_zero_scale_returns_the_model_itself(pack, encoders, references):
    model = tiny_sd15()
    assert guided_model(pack, model, tiny_vae(), encoders, references, m=0.0) is model


@pytest.mark.parametrize(("sampler", "options", "flow"), [
    ("euler", None, False), ("euler_ancestral", None, False), ("euler_ancestral", None, True),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 1.0}, False),  # SamplerEulerAncestral's eta, read from the sampler
])
def test_samplercustomadvanced_step_is_minus_m_grad_x(pack, encoders, references, sampler, options, flow):
    custom = custom_sampling()
    model, vae = tiny_sd15(), tiny_vae()
    if flow:
        model = flow_model(model)
    m = 30.0
    guided = guided_model(pack, model, vae, encoders, references, m, "exact", end=1 / STEPS)
    select = custom.KSamplerSelect().get_sampler(sampler)[0] if options is None else \
        comfy.samplers.ksampler(sampler, options)
    sigmas = custom.BasicScheduler().get_sigmas(model, "normal", STEPS, 1.0)[0]

    def run(model_patcher):
        calls = []
        guider = custom.CFGGuider().get_guider(recording(model_patcher, calls), sd15_conditioning(seed=1),
                                               sd15_conditioning(seed=2), CFG)[0]
        custom.SamplerCustomAdvanced().sample(custom.RandomNoise().get_noise(3)[0], guider, select, sigmas,
                                              {"samples": torch.zeros(1, 4, 8, 8)})
        return calls  # x at each model call; euler and euler_ancestral call once per step

    plain, guided_calls = run(model), run(guided)
    assert torch.equal(guided_calls[0], plain[0])
    nchw = [image.movedim(-1, 1) for image in references]
    expected = -m * grad_x(model, vae, encoders, nchw, plain[0], float(sigmas[0]))
    shift = guided_calls[1] - plain[1]
    eta = (options or {}).get("eta", 1.0)
    assert expected.abs().max() > 100 * torch.finfo(torch.float32).eps * plain[1].abs().max()
    assert torch.allclose(shift, expected, rtol=2e-2, atol=2e-2 * expected.abs().max()), eta


@pytest.mark.parametrize(("sampler", "flow"), [("euler", False), ("heun", False), ("dpmpp_2m_sde", False),
                                               ("uni_pc", False), ("ddim", False), ("dpmpp_2m_sde", True)])
def test_under_ksampler_it_equals_the_sampler_node(pack, encoders, references, sampler, flow, caplog):
    """The run read from the wrappers (sigmas, sampler function, flow offset) is the one the node configures."""
    model, vae = tiny_sd15(), tiny_vae()
    if flow:
        model = flow_model(model)
    clip, dino = encoders
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    node_latent, log = pack.nodes.PosteriorMetricGuidanceSampler().sample(
        model, 3, STEPS, CFG, sampler, "normal", sd15_conditioning(seed=1), sd15_conditioning(seed=2), latent, 1.0,
        vae=vae, subject_reference=references[0], style_reference=references[1], clip_encoder=clip,
        guidance_scale=10.0, clip_subject_weight=1.0, clip_style_weight=1.0, dino_style_weight=1.0,
        gradient_mode="fast", guidance_start=0.0, guidance_end=1.0, guide_every=1, dino_encoder=dino)
    guided = guided_model(pack, model, vae, encoders, references)
    with caplog.at_level(logging.INFO, logger="plora"):
        model_latent = pack.glue.host.run_ksampler(guided, 3, STEPS, CFG, sampler, "normal",
                                                    sd15_conditioning(seed=1), sd15_conditioning(seed=2), latent, 1.0)
    assert logged_runs(caplog) == [(f"P-LoRA guidance ({'euler' if sampler == 'ddim' else sampler}, {STEPS} steps):",
                                    list(range(STEPS)))]
    assert [int(line.split()[1]) for line in log.splitlines()] == list(range(STEPS))
    assert torch.allclose(model_latent["samples"], node_latent["samples"], rtol=1e-5, atol=1e-5)


def test_one_guided_model_runs_again_with_other_steps(pack, encoders, references, caplog):
    model, vae = tiny_sd15(), tiny_vae()
    guided = guided_model(pack, model, vae, encoders, references, start=0.5)
    with caplog.at_level(logging.INFO, logger="plora"):
        short, long = sample(guided, steps=2), sample(guided, steps=6)
    assert logged_runs(caplog) == [("P-LoRA guidance (euler, 2 steps):", [1]),
                                   ("P-LoRA guidance (euler, 6 steps):", [3, 4, 5])]
    fresh = guided_model(pack, model, vae, encoders, references, start=0.5)
    assert torch.equal(sample(fresh, steps=6), long)
    assert not torch.equal(sample(model, steps=2), short)


def euler_written_out(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler's method for the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn)."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]), **extra_args)
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def test_an_unknown_sampler_function_is_guided_as_euler_and_named_once(pack, encoders, references, caplog):
    model, vae = tiny_sd15(), tiny_vae()
    guided = guided_model(pack, model, vae, encoders, references)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    latent = torch.zeros(1, 4, 8, 8)

    def run(sampler):
        return comfy.sample.sample_custom(guided, comfy.sample.prepare_noise(latent, 3), CFG, sampler, sigmas,
                                          sd15_conditioning(seed=1), sd15_conditioning(seed=2), latent,
                                          disable_pbar=True, seed=3)

    with caplog.at_level(logging.WARNING, logger="plora"):
        first, again = run(comfy.samplers.KSAMPLER(euler_written_out)), run(comfy.samplers.KSAMPLER(euler_written_out))
    warnings = [r.getMessage() for r in caplog.records if "unknown sampler function" in r.getMessage()]
    assert len(warnings) == 1 and "euler_written_out" in warnings[0]
    assert torch.equal(first, again)
    euler = run(comfy.samplers.sampler_object("euler"))
    assert torch.allclose(first, euler, rtol=1e-5, atol=1e-5)


def test_dual_cfg_guider_runs_guided(pack, encoders, references, caplog):
    custom = custom_sampling()
    model, vae = tiny_sd15(), tiny_vae()
    guided = guided_model(pack, model, vae, encoders, references)
    sigmas = custom.BasicScheduler().get_sigmas(model, "normal", STEPS, 1.0)[0]
    outputs = []
    for patcher in (model, guided):
        guider = custom.DualCFGGuider().get_guider(patcher, sd15_conditioning(seed=1), sd15_conditioning(seed=4),
                                                   sd15_conditioning(seed=2), 3.0, 2.0, "regular")[0]
        with caplog.at_level(logging.INFO, logger="plora"):
            outputs.append(custom.SamplerCustomAdvanced().sample(
                custom.RandomNoise().get_noise(3)[0], guider, custom.KSamplerSelect().get_sampler("euler")[0], sigmas,
                {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"])
    assert logged_runs(caplog) == [(f"P-LoRA guidance (euler, {STEPS} steps):", list(range(STEPS)))]
    assert torch.isfinite(outputs[1]).all() and not torch.allclose(outputs[0], outputs[1])


def test_a_call_outside_a_run_is_refused_with_a_reason(pack, encoders, references):
    guided = guided_model(pack, tiny_sd15(), tiny_vae(), encoders, references)
    post_cfg = guided.model_options["sampler_post_cfg_function"][-1]
    with pytest.raises(RuntimeError, match="outside a sampling run.*KSampler"):
        post_cfg({"denoised": torch.zeros(1, 4, 8, 8), "sigma": torch.ones(1)})


def test_the_received_model_is_not_modified(pack, encoders, references):
    model = tiny_sd15()
    options = repr(model.model_options)
    wrappers = repr(getattr(model, "wrappers", None))
    guided = guided_model(pack, model, tiny_vae(), encoders, references, mode="exact")
    assert repr(model.model_options) == options and repr(getattr(model, "wrappers", None)) == wrappers
    assert guided is not model and not model.weight_wrapper_patches


def test_flux_with_a_basic_guider_on_flux_guidance_conditioning(pack, encoders, references, caplog):
    """How Flux users sample: SamplerCustomAdvanced, BasicGuider (cfg 1) on FluxGuidance conditioning."""
    from support.host_support import flux_conditioning, tiny_flux

    custom = custom_sampling()
    model, vae = tiny_flux(), tiny_vae(latent_channels=16)
    guided = guided_model(pack, model, vae, encoders, references, mode="exact")
    conditioning = [[c, {**extra, "guidance": 3.5}] for c, extra in flux_conditioning(1)]  # what FluxGuidance sets
    sigmas = custom.BasicScheduler().get_sigmas(model, "simple", 3, 1.0)[0]
    outputs = []
    for patcher in (model, guided):
        guider = custom.BasicGuider().get_guider(patcher, conditioning)[0]
        with caplog.at_level(logging.INFO, logger="plora"):
            outputs.append(custom.SamplerCustomAdvanced().sample(
                custom.RandomNoise().get_noise(3)[0], guider, custom.KSamplerSelect().get_sampler("euler")[0], sigmas,
                {"samples": torch.zeros(1, 16, 8, 8)})[0]["samples"])
    assert logged_runs(caplog) == [("P-LoRA guidance (euler, 3 steps):", [0, 1, 2])]
    assert "fast gradient" not in caplog.text  # exact mode rebuilt the cfg-1 prediction from the cond alone
    assert torch.isfinite(outputs[1]).all() and not torch.allclose(outputs[0], outputs[1])
