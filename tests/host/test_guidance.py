"""PosteriorMetricGuidanceSampler in ComfyUI's sampler, with a tiny UNet, VAE, CLIP and DINO."""

import contextlib
import logging

import comfy.sample
import pytest
import torch
from support import tiny_encoders
from support.host_support import sd15_conditioning, tiny_sd15, tiny_vae

STEPS = 4


@pytest.fixture
def references():
    generator = torch.Generator().manual_seed(7)
    subject = torch.rand(1, 24, 24, 3, generator=generator)
    style = torch.rand(2, 40, 32, 3, generator=generator)  # other sizes and batch than the output
    return subject, style


def run(pack, model, vae, encoders, references, m=10.0, mode="fast", sampler="euler", denoise=1.0,
        latent=None, seed=3, **overrides):
    clip, dino = encoders
    subject, style = references
    latent = latent or {"samples": torch.zeros(1, 4, 8, 8)}
    settings = dict(clip_subject_weight=1.0, clip_style_weight=1.0, dino_style_weight=1.0, gradient_mode=mode,
                    guidance_start=0.0, guidance_end=1.0, guide_every=1)
    settings.update(overrides)
    node = pack.nodes.PosteriorMetricGuidanceSampler()
    return node.sample(model, seed, STEPS, 4.0, sampler, "normal", sd15_conditioning(seed=1),
                       sd15_conditioning(seed=2), latent, denoise, vae=vae, subject_reference=subject,
                       style_reference=style, clip_encoder=clip, guidance_scale=m, dino_encoder=dino, **settings)


def final_score(pack, vae, encoders, references, latent):
    """R of Eq. 19 on the decoded final latent (VAE space)."""
    from plora_pack.plora_core.image_preprocess import to_nchw
    from plora_pack.plora_core.scores import embed_references, metric_residual

    clip, dino = encoders
    refs = embed_references(clip, dino, to_nchw(references[0]), to_nchw(references[1]))
    with torch.no_grad():
        images = (vae.first_stage_model.decode(latent["samples"]) + 1) / 2
        return metric_residual(images, clip, dino, refs)[0]


def test_zero_scale_is_ksampler_bit_for_bit(pack, encoders, references):
    model, vae = tiny_sd15(), tiny_vae()
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    noise = comfy.sample.prepare_noise(latent["samples"], 3)
    plain = comfy.sample.sample(model, noise, STEPS, 4.0, "euler", "normal", sd15_conditioning(seed=1),
                                sd15_conditioning(seed=2), latent["samples"], seed=3)
    out, log = run(pack, model, vae, encoders, references, m=0.0, latent=latent)
    assert torch.equal(out["samples"], plain)


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_guidance_lowers_the_final_score(pack, encoders, references, mode):
    model, vae = tiny_sd15(), tiny_vae()
    plain = run(pack, model, vae, encoders, references, m=0.0)[0]
    guided, log = run(pack, model, vae, encoders, references, m=GUIDANCE_M, mode=mode)
    r_plain = final_score(pack, vae, encoders, references, plain)
    r_guided = final_score(pack, vae, encoders, references, guided)
    assert (r_guided < r_plain).all(), (r_plain, r_guided)
    assert len(log.splitlines()) == STEPS


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral", "uni_pc", "heun", "dpm_2_ancestral",
                                     "dpmpp_2s_ancestral", "dpmpp_2m_sde"])
def test_every_kind_of_sampler_runs_guided(pack, encoders, references, sampler):
    model, vae = tiny_sd15(), tiny_vae()
    plain = run(pack, model, vae, encoders, references, m=0.0, sampler=sampler)[0]
    guided, log = run(pack, model, vae, encoders, references, sampler=sampler)
    assert torch.isfinite(guided["samples"]).all()
    assert not torch.allclose(guided["samples"], plain["samples"])
    assert [int(line.split()[1]) for line in log.splitlines()] == list(range(STEPS))


def test_partial_denoise_and_a_noise_mask(pack, encoders, references):
    model, vae = tiny_sd15(), tiny_vae()
    generator = torch.Generator().manual_seed(1)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    start = torch.randn(1, 4, 8, 8, generator=generator)
    latent = {"samples": start, "noise_mask": mask}
    out, log = run(pack, model, vae, encoders, references, denoise=0.5, latent=latent)
    assert torch.isfinite(out["samples"]).all() and "noise_mask" in out
    assert len(log.splitlines()) == STEPS
    assert torch.allclose(out["samples"][..., 0, 0], start[..., 0, 0], atol=1e-4), "unmasked latent is kept"


def test_window_and_every_n(pack, encoders, references):
    model, vae = tiny_sd15(), tiny_vae()
    _, log = run(pack, model, vae, encoders, references, guidance_start=0.25, guidance_end=1.0, guide_every=2)
    assert [int(line.split()[1]) for line in log.splitlines()] == [1, 3]


def test_received_models_are_not_modified(pack, encoders, references):
    model, vae = tiny_sd15(), tiny_vae()
    clip, dino = encoders
    snapshots = [{k: v.clone() for k, v in m.state_dict().items()}
                 for m in (model.model, vae.first_stage_model, clip.model, dino.model)]
    run(pack, model, vae, encoders, references, mode="exact")
    import comfy.model_management

    comfy.model_management.unload_all_models()
    for before, module in zip(snapshots, (model.model, vae.first_stage_model, clip.model, dino.model)):
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.model_options.get("sampler_post_cfg_function")


def test_vp_units_scale_the_fast_euler_step(pack, encoders, references):
    """guidance_units "variance-preserving", fast mode: x_1(guided) - x_1(plain) =
    -m sqrt(1+s1^2) sqrt(1+s0^2) J(s0) grad_x0 R(D0), J(s) = 1 / (1 + s^2) (Tweedie, unit-variance data)."""
    from plora_pack.plora_core.image_preprocess import to_nchw
    from plora_pack.plora_core.scores import embed_references, metric_residual

    model, vae = tiny_sd15(), tiny_vae()
    clip, dino = encoders
    states = {}

    def capture(name):
        def callback(step, x0, x, total):
            states.setdefault(name, {})[step] = (x0.clone(), x.clone())
        return callback

    m = 300.0  # J(s0) is 1/214 here: a large m keeps the shift far above x's float32 rounding
    sigmas = pack.glue.host.schedule_sigmas(model, STEPS, "euler", "normal", 1.0)
    for name, scale in (("plain", 0.0), ("guided", m)):
        guided = model
        if scale:
            refs = embed_references(clip, dino, to_nchw(references[0]), to_nchw(references[1]))
            settings = pack.glue.guidance.GuidanceSettings(vae, clip, dino, refs, (1.0, 1.0, 1.0), scale, "fast",
                                                            0.0, 0.3, 1, units="variance-preserving")
            guided, hooks = pack.glue.guidance.install_guidance(model, settings, at_run_time=False)
        latent = torch.zeros(1, 4, 8, 8)
        with hooks.run(guided, sigmas, "euler", 4.0) if scale else contextlib.nullcontext():
            comfy.sample.sample(guided, comfy.sample.prepare_noise(latent, 3), STEPS, 4.0, "euler", "normal",
                                sd15_conditioning(seed=1), sd15_conditioning(seed=2), latent, seed=3,
                                callback=capture(name))
    denoised0 = states["plain"][0][0]  # model-space D at step 0, the same in both runs
    x0 = denoised0.clone().requires_grad_(True)
    images = (vae.first_stage_model.decode(model.model.process_latent_out(x0)) + 1) / 2
    refs = embed_references(clip, dino, to_nchw(references[0]), to_nchw(references[1]))
    (grad,) = torch.autograd.grad(metric_residual(images, clip, dino, refs)[0].sum(), x0)
    s0, s1 = float(sigmas[0]), float(sigmas[1])
    expected = -m * (1 + s1**2) ** 0.5 * (1 + s0**2) ** 0.5 / (1 + s0**2) * grad
    shift = states["guided"][1][1] - states["plain"][1][1]  # x after step 0
    # x is ~15 in magnitude here, so float32 rounding of x itself is ~2e-6
    assert expected.abs().max() > 1e-3
    assert torch.allclose(shift, expected, rtol=1e-2, atol=1e-5)


def test_missing_dino_encoder_is_explained(pack, encoders, references):
    model, vae = tiny_sd15(), tiny_vae()
    node = pack.nodes.PosteriorMetricGuidanceSampler()
    with pytest.raises(ValueError, match="no DINO encoder is connected"):
        node.sample(model, 0, 2, 4.0, "euler", "normal", sd15_conditioning(), sd15_conditioning(seed=2),
                    {"samples": torch.zeros(1, 4, 8, 8)}, 1.0, vae=vae, subject_reference=references[0],
                    style_reference=references[1], clip_encoder=encoders[0], guidance_scale=10.0,
                    clip_subject_weight=1.0, clip_style_weight=1.0, dino_style_weight=1.0, gradient_mode="fast",
                    guidance_start=0.0, guidance_end=1.0, guide_every=1)


def test_vae_for_other_latents_is_refused(pack, encoders, references):
    with pytest.raises(ValueError, match="16-channel latents but the model makes 4-channel"):
        run(pack, tiny_sd15(), tiny_vae(latent_channels=16), encoders, references)


def test_nan_gradient_skips_the_step_and_warns_once(pack, encoders, references, caplog):
    model, vae = tiny_sd15(), tiny_vae()
    with torch.no_grad():
        next(vae.first_stage_model.decoder.parameters()).fill_(float("nan"))
    plain = run(pack, model, vae, encoders, references, m=0.0)[0]
    with caplog.at_level(logging.WARNING, logger="plora"):
        out, log = run(pack, model, vae, encoders, references)
    assert torch.equal(out["samples"], plain["samples"])
    assert caplog.text.count("NaN/Inf") == 1 and f"{STEPS} step(s) skipped" in log


def test_encoder_loader_nodes_read_local_files(pack, encoder_files):
    clip_file, dino_folder = encoder_files
    clip = pack.nodes.encoder_nodes.LoadPLoRACLIPEncoder().load(clip_file, tiny_encoders.TINY_CLIP_ARCH, "fp32")[0]
    dino = pack.nodes.encoder_nodes.LoadPLoRADINOEncoder().load(dino_folder, "auto")[0]
    pixels = torch.rand(1, 3, 32, 32)
    assert clip.embed(pixels).shape[0] == 1 and dino.embed(pixels).dtype == torch.float32


GUIDANCE_M = 10.0


def test_models_loaded_under_inference_mode_as_comfyui_loads_them(pack, encoders, references):
    """ComfyUI runs nodes under torch.inference_mode(): its weights are inference tensors."""
    with torch.inference_mode():
        model, vae = tiny_sd15(), tiny_vae()
    assert next(model.model.parameters()).is_inference()
    with torch.inference_mode():
        fast, log = run(pack, model, vae, encoders, references, mode="fast")
    assert len(log.splitlines()) == STEPS
    if hasattr(model, "add_weight_wrapper"):  # ComfyUI 0.3+: the denoiser's weights are cast per call
        with torch.inference_mode():
            exact, log = run(pack, model, vae, encoders, references, mode="exact")
        assert len(log.splitlines()) == STEPS and not torch.equal(exact["samples"], fast["samples"])
    else:
        with pytest.raises(ValueError, match="needs ComfyUI 0.3 or newer.*gradient_mode 'fast'"):
            run(pack, model, vae, encoders, references, mode="exact")


def test_exact_mode_reusing_the_samplers_forward_equals_recomputing_it(pack, encoders, references, monkeypatch):
    guidance = pack.glue.guidance
    recomputed = []
    original = pack.glue.denoiser_gradient.recomputed

    def counting(args, *rest):
        recomputed.append(float(args["sigma"].max()))
        return original(args, *rest)

    monkeypatch.setattr(pack.glue.denoiser_gradient, "recomputed", counting)
    model, vae = tiny_sd15(), tiny_vae()
    reused, log_reused = run(pack, model, vae, encoders, references, mode="exact")
    # at most the first step recomputes (a host whose blocks add in place fails once, then copies)
    assert len(recomputed) <= 1 and len(log_reused.splitlines()) == STEPS

    class WithoutReuse(guidance.GuidanceHooks):
        def __init__(self, settings):
            super().__init__(settings)
            self.state.reuse_forward = False

    monkeypatch.setattr(guidance, "GuidanceHooks", WithoutReuse)
    recomputed.clear()
    again, _ = run(pack, model, vae, encoders, references, mode="exact")
    assert len(recomputed) >= STEPS
    assert torch.allclose(reused["samples"], again["samples"], rtol=1e-4, atol=1e-4)


def test_guidance_decode_size_decodes_a_smaller_image(pack, encoders, references):
    model, vae = tiny_sd15(), tiny_vae()
    full, _ = run(pack, model, vae, encoders, references)
    small, log = run(pack, model, vae, encoders, references, guidance_decode_size=16)
    assert len(log.splitlines()) == STEPS
    assert not torch.allclose(full["samples"], small["samples"])
    assert pack.glue.guidance_widgets.latent_side(vae, 16) == 2
    assert pack.glue.guidance_widgets.latent_side(vae, 0) is None


# ---------------------------------------------------------------- N LoRAs: a reference per LoRA

def three_references(pack, references, third_weight):
    """The pair's references and a third (a second style) through P-LoRA Reference, at `third_weight`."""
    generator = torch.Generator().manual_seed(11)
    third = torch.rand(1, 28, 28, 3, generator=generator)
    (more,) = pack.nodes.PLoRAReference().add(third, "style", third_weight)
    return more, third


def extended_score(pack, vae, encoders, references, more, latent):
    """The extended R of Eq. 19 (plora_core/scores.py) on the decoded final latent."""
    from dataclasses import replace

    from plora_pack.plora_core.image_preprocess import to_nchw
    from plora_pack.plora_core.scores import embed_more_references, embed_references, metric_residual

    clip, dino = encoders
    refs = embed_references(clip, dino, to_nchw(references[0]), to_nchw(references[1]))
    refs = replace(refs, more=embed_more_references(clip, dino, [(r, w, to_nchw(i)) for r, w, i in more.entries]))
    with torch.no_grad():
        images = (vae.first_stage_model.decode(latent["samples"]) + 1) / 2
        return metric_residual(images, clip, dino, refs)[0]


def test_guidance_with_three_references_lowers_the_extended_score(pack, encoders, references):
    model, vae = tiny_sd15(), tiny_vae()
    more, _ = three_references(pack, references, 1.0)
    plain = run(pack, model, vae, encoders, references, m=0.0)[0]
    guided, log = run(pack, model, vae, encoders, references, m=GUIDANCE_M, more_references=more)
    r_plain = extended_score(pack, vae, encoders, references, more, plain)
    r_guided = extended_score(pack, vae, encoders, references, more, guided)
    assert (r_guided < r_plain).all(), (r_plain, r_guided)
    two_only = run(pack, model, vae, encoders, references, m=GUIDANCE_M)[0]
    assert not torch.allclose(guided["samples"], two_only["samples"]), "the third reference changes the guidance"


def test_a_third_reference_at_weight_zero_is_two_reference_guidance(pack, encoders, references):
    model, vae = tiny_sd15(), tiny_vae()
    more, _ = three_references(pack, references, 0.0)
    with_zero = run(pack, model, vae, encoders, references, m=GUIDANCE_M, more_references=more)[0]
    two = run(pack, model, vae, encoders, references, m=GUIDANCE_M)[0]
    assert torch.allclose(with_zero["samples"], two["samples"], atol=1e-5)


def test_of_several_extra_references_those_at_weight_zero_drop_out(pack, encoders, references):
    """Four references (the pair's, a third style, a fourth subject at weight 0): the same guidance as the
    pair's and the third alone; the zero-weight reference is not even embedded."""
    model, vae = tiny_sd15(), tiny_vae()
    more, _ = three_references(pack, references, 1.0)
    (four,) = pack.nodes.PLoRAReference().add(torch.rand(1, 20, 20, 3), "subject", 0.0, more)
    assert [role for role, _, _ in four.entries] == ["style", "subject"]
    with_four = run(pack, model, vae, encoders, references, m=GUIDANCE_M, more_references=four)[0]
    with_three = run(pack, model, vae, encoders, references, m=GUIDANCE_M, more_references=more)[0]
    assert torch.allclose(with_four["samples"], with_three["samples"], atol=1e-5)


def test_a_reference_with_another_role_is_refused(pack, references):
    with pytest.raises(ValueError, match="role"):
        pack.nodes.PLoRAReference().add(references[0], "lighting", 1.0)
    from plora_pack.glue.references import ReferenceImages
    with pytest.raises(ValueError, match="subject or style"):  # past the node's input check, the value's own
        ReferenceImages().with_reference(references[0], "lighting", 1.0)
