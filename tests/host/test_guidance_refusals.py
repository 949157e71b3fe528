"""Guidance inputs that cannot work are refused up front, before anything is sampled."""

import pytest
import torch
from support.host_support import sd15_conditioning, tiny_sd15, tiny_vae


def sampler_node(pack, encoders, latent, **widgets):
    clip, dino = encoders
    generator = torch.Generator().manual_seed(7)
    settings = {"clip_subject_weight": 1.0, "clip_style_weight": 1.0, "dino_style_weight": 1.0,
                "gradient_mode": "fast", "guidance_start": 0.0, "guidance_end": 1.0, "guide_every": 1, **widgets}
    return pack.nodes.PosteriorMetricGuidanceSampler().sample(
        model=tiny_sd15(), seed=3, steps=2, cfg=4.0, sampler_name="euler", scheduler="normal",
        positive=sd15_conditioning(seed=1), negative=sd15_conditioning(seed=2), latent_image={"samples": latent},
        denoise=1.0, vae=tiny_vae(), subject_reference=torch.rand(1, 24, 24, 3, generator=generator),
        style_reference=torch.rand(1, 32, 32, 3, generator=generator), clip_encoder=clip, guidance_scale=10.0,
        dino_encoder=dino, **settings)


def test_all_three_weights_zero_is_refused_saying_what_to_do(pack, encoders):
    with pytest.raises(ValueError, match="All three score weights .* are 0.*guidance_scale to 0"):
        sampler_node(pack, encoders, torch.zeros(1, 4, 8, 8), clip_subject_weight=0.0, clip_style_weight=0.0,
                     dino_style_weight=0.0)


def test_a_latent_of_several_video_frames_is_refused_by_the_guidance(pack, encoders):
    with pytest.raises(ValueError, match=r"P-LoRA Metric Guidance Sampler: the latent holds 3 video frames"):
        sampler_node(pack, encoders, torch.zeros(1, 4, 3, 8, 8))


def test_the_widgets_object_takes_exactly_the_declared_inputs_in_their_order(pack):
    """One list of guidance widgets: the nodes' INPUT_TYPES and GuidanceWidgets' fields cannot drift apart."""
    widgets = pack.glue.guidance_widgets
    required, optional = widgets.guidance_inputs("")
    assert widgets.GuidanceWidgets.names() == (*required, *optional)
    for node in (pack.nodes.PLoRAMetricGuidance, pack.nodes.PosteriorMetricGuidanceSampler):
        declared = node.INPUT_TYPES()
        assert list(declared["required"])[-len(required):] == list(required)
        assert list(declared["optional"]) == list(optional)


def test_a_nan_widget_is_refused_through_the_widgets_object(pack, encoders):
    with pytest.raises(ValueError, match="P-LoRA Metric Guidance Sampler: input 'guidance_start'|"
                                         "PosteriorMetricGuidanceSampler: input 'guidance_start'"):
        sampler_node(pack, encoders, torch.zeros(1, 4, 8, 8), guidance_start=float("nan"))
