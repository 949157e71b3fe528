"""SD3.5, Chroma, Qwen-Image, HiDream and Wan 2.1/2.2: the gate, family detection and the frontend warning.

Tiny models built by ComfyUI's own classes (tests/family_models.py), LoRA files in the formats their
trainers write, loaded through the pack's nodes. Needs ComfyUI v0.3.3x or newer (COMFYUI_PATH).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
import comfy.sd
import comfy.utils

import support.family_models as fm

_MISSING = fm.missing_family_classes()
if _MISSING:
    pytest.skip(f"needs ComfyUI's SD3/Chroma/Qwen-Image/HiDream/Wan model classes ({', '.join(_MISSING)} missing): "
                "run with COMFYUI_PATH=<a ComfyUI v0.3.64+ checkout>",
                allow_module_level=True)

from support.host_support import ROOT, tiny_flux  # noqa: E402


@dataclass
class LoraSpec:
    """One trainer's file: its key format and {layer name as that trainer writes it: (out, in)}."""

    trainer: str
    key_format: str
    layers: Callable[[int], dict]  # hidden width -> layers
    metadata: dict = field(default_factory=dict)


@dataclass
class FamilySpec:
    name: str
    build: Callable
    hidden: int
    subject: LoraSpec
    style: LoraSpec
    gated: set[str]  # ComfyUI module paths both LoRAs touch (inside diffusion_model)
    family: str  # what host.model_family and a LoRA file's keys name the tiny model
    extra: list[LoraSpec] = field(default_factory=list)  # further trainers' formats (detection only)


def _prefixed(prefix: str, layers: dict) -> dict:
    return {prefix + name: shape for name, shape in layers.items()}


def sd3_diffusers(h):  # diffusers' SD3 LoRA script, SimpleTuner, ai-toolkit: q/k/v apart, fused in ComfyUI
    return _prefixed("transformer.transformer_blocks.0.", {
        "attn.to_q": (h, h), "attn.to_k": (h, h), "attn.to_v": (h, h), "attn.add_q_proj": (h, h),
        "attn.to_out.0": (h, h), "ff.net.0.proj": (4 * h, h), "attn2.to_q": (h, h)})


def sd3_kohya(h):  # sd-scripts (SD3 branch): ComfyUI's own MMDiT names, fused qkv
    return {"joint_blocks.0.x_block.attn.qkv": (3 * h, h), "joint_blocks.0.context_block.attn.qkv": (3 * h, h),
            "joint_blocks.0.x_block.mlp.fc1": (4 * h, h), "joint_blocks.1.x_block.attn.qkv": (3 * h, h)}


def sd3_onetrainer(h):
    return {"transformer_blocks.0.attn.to_q": (h, h), "transformer_blocks.0.attn2.to_q": (h, h)}


def flux_blocks_kohya(h):  # sd-scripts Flux/Chroma LoRA: BFL names, fused qkv and linear1
    return {"double_blocks.0.img_attn.qkv": (3 * h, h), "double_blocks.0.img_mlp.0": (4 * h, h),
            "double_blocks.0.txt_attn.proj": (h, h), "single_blocks.0.linear1": (7 * h, h)}


def chroma_diffusers(h):  # diffusers/SimpleTuner Chroma: split q/k/v, proj_mlp
    return _prefixed("transformer.", {
        "transformer_blocks.0.attn.to_q": (h, h), "transformer_blocks.0.attn.to_k": (h, h),
        "transformer_blocks.0.attn.to_v": (h, h), "transformer_blocks.0.ff.net.0.proj": (4 * h, h),
        "single_transformer_blocks.0.attn.to_q": (h, h), "single_transformer_blocks.0.proj_mlp": (4 * h, h)})


def chroma_comfy(h):  # diffusion-pipe / ComfyUI's own names, with Chroma's distilled guidance layer trained too
    return _prefixed("diffusion_model.", {"double_blocks.0.img_attn.qkv": (3 * h, h),
                                          "distilled_guidance_layer.layers.0.in_layer": (64, 64)})


def qwen_layers(h):
    return {f"transformer_blocks.{b}.{name}": shape for b in (0, 1) for name, shape in {
        "attn.to_q": (h, h), "attn.add_k_proj": (h, h), "attn.to_out.0": (h, h),
        "img_mlp.net.0.proj": (4 * h, h), "txt_mlp.net.2": (h, 4 * h)}.items()}


def hidream_layers(h):  # attention of both streams, the shared expert and the text feed-forward
    swiglu = 256  # the tiny model's SwiGLU width (ComfyUI rounds it up to a multiple of 256)
    block = {"attn1.to_q": (h, h), "attn1.to_k": (h, h), "attn1.to_v_t": (h, h), "attn1.to_out": (h, h),
             "ff_i.shared_experts.w1": (swiglu, h), "ff_t.w1": (swiglu, h)}
    layers = {f"double_stream_blocks.0.block.{n}": s for n, s in block.items()}
    layers["single_stream_blocks.0.block.attn1.to_q"] = (h, h)
    return layers


def wan_layers(h, ffn=128):
    return {f"blocks.{b}.{name}": shape for b in (0, 1) for name, shape in {
        "self_attn.q": (h, h), "self_attn.k": (h, h), "self_attn.v": (h, h), "self_attn.o": (h, h),
        "cross_attn.q": (h, h), "cross_attn.k": (h, h), "cross_attn.o": (h, h),
        "ffn.0": (ffn, h), "ffn.2": (h, ffn)}.items()}


WAN_METADATA = {"modelspec.architecture": "wan2.1/lora"}  # musubi-tuner writes this for Wan 2.1 and 2.2
FAMILIES = [
    FamilySpec("SD3.5", fm.tiny_sd35, fm.SD3_HIDDEN,
               LoraSpec("diffusers", "peft", sd3_diffusers), LoraSpec("sd-scripts", "kohya", sd3_kohya),
               {"joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.qkv",
                "joint_blocks.0.x_block.mlp.fc1"},
               f"SD3.5 (width {fm.SD3_HIDDEN})", [LoraSpec("OneTrainer", "onetrainer", sd3_onetrainer)]),
    FamilySpec("Chroma", fm.tiny_chroma, fm.CHROMA_HIDDEN,
               LoraSpec("sd-scripts", "kohya", flux_blocks_kohya, {"modelspec.architecture": "chroma/lora"}),
               LoraSpec("diffusers", "peft", chroma_diffusers),
               {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "single_blocks.0.linear1"},
               "Chroma", [LoraSpec("diffusion-pipe", "peft", chroma_comfy)]),
    FamilySpec("Qwen-Image", fm.tiny_qwen_image, fm.QWEN_HIDDEN,
               LoraSpec("diffusers/ai-toolkit", "peft", lambda h: _prefixed("transformer.", qwen_layers(h))),
               LoraSpec("musubi-tuner", "kohya", qwen_layers, {"modelspec.architecture": "Qwen-Image/lora"}),
               set(qwen_layers(fm.QWEN_HIDDEN)), "Qwen-Image",
               [LoraSpec("DiffSynth-Studio", "peft_default", qwen_layers)]),
    FamilySpec("HiDream", fm.tiny_hidream, fm.HIDREAM_HIDDEN,
               LoraSpec("SimpleTuner", "peft", lambda h: _prefixed("transformer.", hidream_layers(h))),
               LoraSpec("diffusion-pipe", "peft", lambda h: _prefixed("diffusion_model.", hidream_layers(h))),
               set(hidream_layers(fm.HIDREAM_HIDDEN)), "HiDream"),
    FamilySpec("Wan 2.1", fm.tiny_wan21, fm.WAN_HIDDEN,
               LoraSpec("musubi-tuner", "kohya", wan_layers, WAN_METADATA),
               LoraSpec("diffusion-pipe/ai-toolkit", "peft", lambda h: _prefixed("diffusion_model.", wan_layers(h))),
               set(wan_layers(fm.WAN_HIDDEN)), f"Wan (width {fm.WAN_HIDDEN})"),
    FamilySpec("Wan 2.2", fm.tiny_wan22, fm.WAN_HIDDEN,
               LoraSpec("musubi-tuner", "kohya", wan_layers, WAN_METADATA),
               LoraSpec("diffusion-pipe/ai-toolkit", "peft", lambda h: _prefixed("diffusion_model.", wan_layers(h))),
               set(wan_layers(fm.WAN_HIDDEN)), f"Wan (width {fm.WAN_HIDDEN})"),
]
BY_NAME = {spec.name: spec for spec in FAMILIES}


def write(tmp_path, spec: FamilySpec, lora: LoraSpec, seed: int):
    file = tmp_path / f"{spec.name.replace(' ', '_')}_{lora.trainer.replace('/', '_')}_{seed}.safetensors"
    return fm.write_lora(file, lora.layers(spec.hidden), lora.key_format, seed=seed, metadata=lora.metadata or None)


def merged_directly(model, files):
    """Both LoRAs merged as two chained LoraLoaders do (ComfyUI's own code): the oracle to differ from."""
    import comfy.sd
    from plora_pack.plora_core.lora_file import read_lora_file

    for file in files:
        model = comfy.sd.load_lora_for_models(model, None, read_lora_file(str(file)).tensors, 1.0, 0.0)[0]
    return model


@pytest.mark.parametrize("name", list(BY_NAME))
def test_the_gate_runs_on_each_family_and_differs_from_a_direct_merge(pack, tmp_path, name):
    spec = BY_NAME[name]
    model = spec.build()
    subject, style = write(tmp_path, spec, spec.subject, 1), write(tmp_path, spec, spec.style, 2)
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
    patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]
    gated = fm.sample(patched, name)
    merged, base = fm.sample(merged_directly(model, [subject, style]), name), fm.sample(model, name)

    assert gated.shape == torch.Size(fm.latent_shape(name)) and torch.isfinite(gated).all()
    assert not torch.allclose(merged, base, atol=1e-3), "the LoRAs must change the model for the test to mean anything"
    assert not torch.allclose(gated, merged, atol=1e-3), f"{name}: the gated run equals merging both LoRAs"
    assert not model.patches, "the MODEL given to the node was modified"

    state = pack.nodes.selection_map_node.gate_state_of(patched)
    assert state is not None and state.recorder.steps() == [0, 1, 2]
    layers = state.recorder.layers()  # a fused layer is decided per row slice: 'path[to_q]', ...
    assert {layer.split("[")[0] for layer in layers} == {f"diffusion_model.{p}" for p in spec.gated}
    both = torch.cat([mask.reshape(-1).float() for mask in state.recorder.decisions.values()])
    assert both.numel() == 3 * len(layers) * 2  # 3 steps x gated layers (slices) x (cond, uncond)


def test_sd35_and_chroma_fused_layers_are_gated_per_row_slice(pack, tmp_path):
    """diffusers LoRAs name q, k and v apart; ComfyUI fuses them: each slice gets its own decision."""
    for name, fused in (("SD3.5", "joint_blocks.0.x_block.attn.qkv"), ("Chroma", "double_blocks.0.img_attn.qkv")):
        spec = BY_NAME[name]
        subject, style = write(tmp_path, spec, spec.subject, 3), write(tmp_path, spec, spec.style, 4)
        pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
        patched = pack.nodes.PLoRAModelPatcher().patch(spec.build(), pair, "kl", 1.0, 0.0, 1.0)[0]
        fm.sample(patched, name, steps=1)
        slices = [layer for layer in pack.nodes.selection_map_node.gate_state_of(patched).recorder.layers()
                  if layer.startswith(f"diffusion_model.{fused}[")]
        assert len(slices) == 3, (name, slices)


@pytest.mark.parametrize("name", list(BY_NAME))
def test_family_is_named_from_the_lora_files_and_the_model(pack, tmp_path, name):
    spec = BY_NAME[name]
    from plora_pack.plora_core.lora_info import families_compatible

    model_family = pack.glue.host.model_family(spec.build())
    assert model_family == spec.family
    for seed, lora in enumerate([spec.subject, spec.style, *spec.extra]):
        file = write(tmp_path, spec, lora, seed)
        details = pack.glue.routes.lora_details(str(file), file.name)
        assert families_compatible(details["family"], model_family), (lora.trainer, details)
        expected = {"Chroma": {"diffusers": "Flux or Chroma"}}.get(name, {}).get(lora.trainer, spec.family)
        assert details["family"] == expected, (lora.trainer, details)


@pytest.mark.parametrize("name,width,family", [("SD3.5", 1536, "SD3.5 Medium"), ("SD3.5", 2432, "SD3.5 Large"),
                                               ("Wan 2.1", 1536, "Wan 1.3B"), ("Wan 2.1", 5120, "Wan 14B"),
                                               ("Wan 2.2", 3072, "Wan 5B")])
def test_real_widths_name_the_size(pack, name, width, family):
    """The model's config at a real width (not built: only its family is read) and a LoRA header of that width."""
    import comfy.supported_models

    from plora_pack.plora_core.lora_info import lora_family

    spec = BY_NAME[name]
    config_name = fm.FAMILY_CLASSES[name][0]
    unet = dict(fm.SD3_UNET, depth=width // 64) if name == "SD3.5" else dict(fm.WAN_UNET, dim=width)
    config = getattr(comfy.supported_models, config_name)(unet)
    assert pack.glue.host.model_family(SimpleNamespace(model=SimpleNamespace(model_config=config))) == family
    shapes = {}
    for key, shape in spec.subject.layers(width).items():
        down, up = (4, shape[1]), (shape[0], 4)
        key = key if spec.subject.key_format == "peft" else "lora_unet_" + key.replace(".", "_")
        suffix = (".lora_A.weight", ".lora_B.weight") if spec.subject.key_format == "peft" else \
            (".lora_down.weight", ".lora_up.weight")
        shapes[key + suffix[0]], shapes[key + suffix[1]] = down, up
    assert lora_family(shapes, spec.subject.metadata) == family


def test_hidream_routed_experts_are_merged_directly_not_decided_per_token(pack, tmp_path):
    """HiDream's routed experts run on the tokens routed to them, flattened over the batch ([N tokens, C],
    ComfyUI's MOEFeedForwardSwiGLU): there is no per-image choice, so both LoRAs are merged there."""
    spec = BY_NAME["HiDream"]
    experts = {"double_stream_blocks.0.block.ff_i.experts.0.w1": (256, spec.hidden)}
    files = [fm.write_lora(tmp_path / f"experts_{seed}.safetensors", _prefixed(prefix, experts), "peft", seed=seed)
             for seed, prefix in ((1, "transformer."), (2, "diffusion_model."))]
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(files[0]), 1.0, str(files[1]), 1.0)
    model = spec.build()
    patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]
    assert pack.glue.gate.gated_layers(patched) == {}
    merged = model
    for file in files:
        merged = comfy.sd.load_lora_for_models(merged, None, comfy.utils.load_torch_file(str(file)), 1.0, 0)[0]
    assert torch.allclose(fm.sample(patched, "HiDream", steps=2), fm.sample(merged, "HiDream", steps=2),
                          rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora_of,model_of", [("Wan 2.1", "Qwen-Image"), ("Qwen-Image", "HiDream"),
                                              ("SD3.5", "Chroma"), ("HiDream", "Wan 2.1")])
def test_a_lora_of_another_family_is_refused_naming_both_families(pack, tmp_path, lora_of, model_of):
    lora_spec, model_spec = BY_NAME[lora_of], BY_NAME[model_of]
    file = write(tmp_path, lora_spec, lora_spec.style, 6)
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(file), 1.0, str(file), 0.0)
    with pytest.raises(ValueError, match=rf"{re.escape(file.name)} matches none of this model's layers: the model "
                                         rf"is {re.escape(model_spec.family)}, the file looks like a "
                                         rf"{re.escape(lora_spec.family)} LoRA"):
        pack.nodes.PLoRAModelPatcher().patch(model_spec.build(), pair, "kl", 1.0, 0.0, 1.0)


@pytest.mark.parametrize("name", ["SD3.5", "Wan 2.1"])
def test_a_lora_of_another_size_gets_the_family_message(pack, tmp_path, name):
    """Same layer names, another width (a Wan 14B LoRA on Wan 1.3B): both sizes are named."""
    spec = BY_NAME[name]
    wide = write(tmp_path, FamilySpec(name, spec.build, 2 * spec.hidden, spec.subject, spec.style, set(), ""),
                 spec.subject, 7)
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(wide), 1.0, str(wide), 0.0)
    lora_family = f"{name.split(' ')[0]} (width {2 * spec.hidden})"
    with pytest.raises(ValueError, match=rf"is a {re.escape(lora_family)} LoRA but the model is "
                                         rf"{re.escape(spec.family)}.*Pick a LoRA trained for"):
        pack.nodes.PLoRAModelPatcher().patch(spec.build(), pair, "kl", 1.0, 0.0, 1.0)


# ------------------------------------------------------------------ the frontend's warning


def model_file(tmp_path, name: str, model_patcher):
    """The diffusion model as a diffusion_models/ file (UNETLoader's input): ComfyUI's keys, no prefix."""
    from safetensors.torch import save_file

    file = tmp_path / f"{name.replace(' ', '_')}_model.safetensors"
    save_file({k: v.contiguous().clone() for k, v in model_patcher.model.diffusion_model.state_dict().items()},
              str(file))
    return file


def js_compatible(pairs: list[tuple[str, str]]) -> list[bool]:
    """web/js/plora.js's own `compatible(loraFamily, modelFamily)`, run by node on the route's strings."""
    source = (ROOT / "web" / "js" / "plora.js").read_text()
    match = re.search(r"^function compatible\(.*?^}", source, re.M | re.S)
    assert match, "web/js/plora.js has no top-level `function compatible(loraFamily, modelFamily)` any more"
    script = f"{match.group(0)}\nconsole.log(JSON.stringify({json.dumps(pairs)}.map(([l, m]) => compatible(l, m))));"
    done = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_the_route_families_make_the_frontend_warn_exactly_on_a_mismatch(pack, tmp_path):
    routes = pack.glue.routes
    builders = {**{name: spec.build for name, spec in BY_NAME.items()}, "Flux": tiny_flux}
    models = {}
    for name, build in builders.items():
        file = model_file(tmp_path, name, build())
        models[name] = routes.model_details(str(file), file.name)["family"]
    assert models == {**{name: spec.family for name, spec in BY_NAME.items()}, "Flux": "Flux"}
    loras = {}
    for name, spec in BY_NAME.items():
        for lora in (spec.subject, spec.style):
            file = write(tmp_path, spec, lora, 5)
            loras[(name, lora.trainer)] = routes.lora_details(str(file), file.name)["family"]

    def same_model(lora_of: str, trainer: str, model_of: str) -> bool:
        """The oracle: a LoRA fits the family it was written for; Wan 2.1 and 2.2 share the tiny width; a
        Chroma LoRA in diffusers names without Chroma's own layers is also a valid Flux LoRA (same blocks)."""
        wan = {lora_of, model_of} <= {"Wan 2.1", "Wan 2.2"}
        return lora_of == model_of or wan or (lora_of, trainer, model_of) == ("Chroma", "diffusers", "Flux")

    pairs = [(family, models[model_of]) for (lora_of, trainer), family in loras.items() for model_of in models]
    expected = [same_model(lora_of, trainer, model_of) for (lora_of, trainer) in loras for model_of in models]
    from plora_pack.plora_core.lora_info import families_compatible

    assert [families_compatible(lora, model) for lora, model in pairs] == expected
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the JS rule itself was not run (the Python rule above was)")
    assert js_compatible(pairs) == expected


# ------------------------------------------------------------------ video models and guidance


def test_guidance_refuses_a_video_latent_with_a_clear_message(pack):
    from plora_pack.glue.model_kind import check_image_latent, is_video_model, latent_frames

    wan, qwen = BY_NAME["Wan 2.1"].build(), BY_NAME["Qwen-Image"].build()
    assert is_video_model(wan) and is_video_model(BY_NAME["Wan 2.2"].build())
    assert not is_video_model(qwen) and not is_video_model(BY_NAME["SD3.5"].build())
    assert latent_frames(torch.zeros(1, 16, 8, 8)) == 1 and latent_frames(torch.zeros(1, 16, 5, 8, 8)) == 5
    with pytest.raises(ValueError, match=r"Metric Guidance.*5 video frames.*Wan.*image models.*P-LoRA Model Patcher"):
        check_image_latent(wan, torch.zeros(1, 16, 5, 8, 8), "P-LoRA Metric Guidance")
    check_image_latent(wan, torch.zeros(1, 16, 1, 8, 8), "P-LoRA Metric Guidance")  # one frame: an image
    check_image_latent(qwen, torch.zeros(1, 16, 1, 8, 8), "P-LoRA Metric Guidance")  # Qwen-Image's latent
