"""Differentiable copies of the VAE, TAESD and CLIP_VISION copy parameters and buffers, never host attributes.

Current ComfyUI (dynamic VRAM) hangs native buffer handles on its modules; their `__del__` frees
the memory. The stand-in here refuses to be deep-copied (as a native handle does) and records
when it would free: guidance must work, the originals stay as they were, and no copy holds it.
"""

import copy
import gc
import itertools
import json

import comfy.clip_vision
import pytest
import torch
from support.host_support import _randomise, sd15_conditioning, tiny_sd15, tiny_vae
from test_clip_vision_encoder import TINY_VISION

STEPS = 3


class NativeHandle:
    """A native buffer handle: cannot be copied; dropping the last reference frees the buffer."""

    freed: list[int] = []  # serial numbers of the handles whose buffer would have been freed
    made = itertools.count()

    def __init__(self):
        self.serial = next(NativeHandle.made)

    def __deepcopy__(self, memo):
        raise RuntimeError("a native buffer handle cannot be copied")

    def __copy__(self):
        raise RuntimeError("a native buffer handle cannot be copied")

    def __reduce__(self):
        raise RuntimeError("a native buffer handle cannot be pickled")

    def __del__(self):
        NativeHandle.freed.append(self.serial)


def attach_handle(module: torch.nn.Module) -> tuple[torch.nn.Module, NativeHandle]:
    """The handle on the first sub-module with a weight, as ComfyUI's dynamic VRAM hangs `_v` there."""
    holder = next(m for m in module.modules() if m is not module and getattr(m, "weight", None) is not None)
    holder._v = NativeHandle()
    return holder, holder._v


def holds_handle(value, seen=None) -> bool:
    """A NativeHandle anywhere in the module's attributes (recursively through modules and containers)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return False
    seen.add(id(value))
    if isinstance(value, NativeHandle):
        return True
    if isinstance(value, torch.nn.Module):
        return any(holds_handle(v, seen) for v in vars(value).values())
    if isinstance(value, dict):
        return any(holds_handle(v, seen) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(holds_handle(v, seen) for v in value)
    return False


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def unchanged(before, module):
    after = module.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def guided_run(pack, vae, encoders):
    clip, dino = encoders
    generator = torch.Generator().manual_seed(7)
    model = tiny_sd15()
    with torch.inference_mode():  # as ComfyUI runs nodes
        return pack.nodes.PosteriorMetricGuidanceSampler().sample(
            model, 3, STEPS, 4.0, "euler", "normal", sd15_conditioning(seed=1), sd15_conditioning(seed=2),
            {"samples": torch.zeros(1, 4, 8, 8)}, 1.0, vae=vae,
            subject_reference=torch.rand(1, 24, 24, 3, generator=generator),
            style_reference=torch.rand(1, 32, 32, 3, generator=generator), clip_encoder=clip, guidance_scale=10.0,
            clip_subject_weight=1.0, clip_style_weight=1.0, dino_style_weight=1.0, gradient_mode="exact",
            guidance_start=0.0, guidance_end=1.0, guide_every=1, dino_encoder=dino)


def test_vae_with_a_native_handle(pack, encoders):
    with torch.inference_mode():
        vae, twin = tiny_vae(), tiny_vae()  # same seed: the same weights
    holder, handle = attach_handle(vae.first_stage_model)
    with pytest.raises(RuntimeError, match="cannot be copied"):
        copy.deepcopy(vae.first_stage_model)  # what a deep copy of the host module would do
    before = snapshot(vae.first_stage_model)

    latent, log = guided_run(pack, vae, encoders)
    assert len(log.splitlines()) == STEPS
    assert torch.equal(latent["samples"], guided_run(pack, twin, encoders)[0]["samples"])
    assert unchanged(before, vae.first_stage_model) and holder._v is handle

    decoder = pack.glue.guidance.differentiable_decoder(vae)
    assert not holds_handle(decoder) and holds_handle(vae.first_stage_model)
    assert not any(p.is_inference() or p.requires_grad for p in decoder.parameters())
    assert_decodes_like_the_host_and_backprops(decoder, vae.first_stage_model, seed=0)
    del decoder
    gc.collect()
    assert handle.serial not in NativeHandle.freed and holder._v is handle


def assert_decodes_like_the_host_and_backprops(decoder, host_model, seed: int) -> None:
    """The copy decodes exactly as the host model does, and gradients flow through it."""
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    with torch.no_grad():
        host = host_model.decode(z.detach())
    out = decoder.decode(z)
    assert torch.equal(out.detach(), host)
    (grad,) = torch.autograd.grad(out.square().sum(), z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_taesd_copy_decodes_like_the_host_and_backprops(pack):
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD()
    _randomise(taesd, 2, 0.05)
    with torch.inference_mode():
        vae = comfy.sd.VAE(sd=taesd.state_dict())
    _, handle = attach_handle(vae.first_stage_model)
    before = snapshot(vae.first_stage_model)
    decoder = pack.glue.guidance.differentiable_decoder(vae)
    assert type(decoder) is type(vae.first_stage_model) and not holds_handle(decoder)
    assert_decodes_like_the_host_and_backprops(decoder, vae.first_stage_model, seed=1)
    assert unchanged(before, vae.first_stage_model)


def test_clip_vision_with_a_native_handle(pack, tmp_path):
    config = tmp_path / "tiny_clip_vision.json"
    config.write_text(json.dumps(TINY_VISION))
    with torch.inference_mode():
        clip_vision = comfy.clip_vision.ClipVisionModel(str(config))
        _randomise(clip_vision.model, 3, 0.1)
    holder, handle = attach_handle(clip_vision.model)
    before = snapshot(clip_vision.model)

    encoder = pack.nodes.encoder_nodes.PLoRAEncoderFromCLIPVision().wrap(clip_vision)[0]
    assert not holds_handle(encoder.model) and holds_handle(clip_vision.model)
    pixels = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(2), requires_grad=True)
    (grad,) = torch.autograd.grad(encoder.embed(pixels).square().sum(), pixels)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert unchanged(before, clip_vision.model) and holder._v is handle
    del encoder
    gc.collect()
    assert handle.serial not in NativeHandle.freed and holder._v is handle


def test_shared_submodules_and_tied_weights_stay_shared(pack):
    """The copy keeps the original's structure: a module used twice is one module, tied weights one tensor."""
    first, second = torch.nn.Linear(96, 96), torch.nn.Linear(96, 96)
    second.weight = first.weight  # tied, as an embedding and its output projection can be
    model = torch.nn.ModuleDict({"first": first, "again": first, "second": second})
    copied = pack.glue.trainable_copy.frozen_normal_copy(model)
    assert copied["first"] is copied["again"] and copied["first"] is not first
    assert copied["second"].weight is copied["first"].weight and copied["second"].bias is not copied["first"].bias
    assert torch.equal(copied["second"].weight, first.weight) and not copied["first"].weight.requires_grad
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(copied["second"](copied["first"](x)), second(first(x)))
