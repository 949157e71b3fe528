"""Full P-LoRA: the KL gate (PFK) and exact score guidance (PMK) in one sampling run.

ComfyUI runs every node under inference mode, so the gate's LoRA factors are inference
tensors; exact guidance differentiates through the gated layers outside it. It must work on
a fresh patched MODEL, after an unguided run of the same MODEL (whose calls cached the
factors), and with a guidance window that starts late.
"""

import pytest
import torch
from support.host_support import (attention_paths, module_shapes, sample, sd15_conditioning, tiny_sd15, tiny_vae,
                          write_kohya_lora)

STEPS = 4


@pytest.fixture
def gated(pack, tmp_path):
    """A tiny SD1.5 model gated by the node under inference mode, as ComfyUI runs it."""
    model = tiny_sd15()
    shapes = module_shapes(model, attention_paths(model))
    subject = write_kohya_lora(tmp_path / "subject.safetensors", shapes, seed=1)
    style = write_kohya_lora(tmp_path / "style.safetensors", shapes, seed=2, alpha=2.0)
    with torch.inference_mode():
        pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
        patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]
    return patched


def guided(pack, model, encoders, mode="exact", **settings):
    clip, dino = encoders
    generator = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        return pack.nodes.PosteriorMetricGuidanceSampler().sample(
            model=model, seed=3, steps=STEPS, cfg=4.0, sampler_name="euler", scheduler="normal",
            positive=sd15_conditioning(seed=1), negative=sd15_conditioning(seed=2),
            latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0, vae=tiny_vae(),
            subject_reference=torch.rand(1, 24, 24, 3, generator=generator),
            style_reference=torch.rand(1, 32, 32, 3, generator=generator), clip_encoder=clip,
            guidance_scale=10.0, clip_subject_weight=1.0, clip_style_weight=1.0, dino_style_weight=1.0,
            gradient_mode=mode, guidance_start=settings.get("guidance_start", 0.0), guidance_end=1.0,
            guide_every=1, dino_encoder=dino)


def guided_steps(log: str) -> list[int]:
    return [int(line.split()[1]) for line in log.splitlines() if line.startswith("step")]


def test_exact_guidance_on_a_gated_model(pack, gated, encoders):
    state = pack.glue.gate.gate_state_of(gated)
    assert all(g.deltas._cache == {} for g in pack.glue.gate.gated_layers(gated).values())  # nothing cached yet
    latent, log = guided(pack, gated, encoders)
    assert guided_steps(log) == list(range(STEPS))
    assert torch.isfinite(latent["samples"]).all()
    assert state.recorder.steps() == list(range(STEPS))  # the gate decided at every step of the guided run
    fast, _ = guided(pack, gated, encoders, mode="fast")
    assert not torch.allclose(latent["samples"], fast["samples"], atol=1e-5)


def test_exact_guidance_after_an_unguided_run_of_the_same_model(pack, gated, encoders):
    with torch.inference_mode():
        unguided = sample(gated, steps=STEPS, seed=3)  # caches the factors as inference tensors
    cached = next(iter(pack.glue.gate.gated_layers(gated).values())).deltas._cache  # the DeltaStack's factors
    assert cached and all(t.is_inference() for factors in cached.values() for t in factors)
    latent, log = guided(pack, gated, encoders)
    assert guided_steps(log) == list(range(STEPS))
    assert not torch.allclose(latent["samples"], unguided, atol=1e-4)


def test_exact_guidance_starting_late_on_a_gated_model(pack, gated, encoders):
    latent, log = guided(pack, gated, encoders, guidance_start=0.5)
    assert guided_steps(log) == [2, 3]
    assert torch.isfinite(latent["samples"]).all()
