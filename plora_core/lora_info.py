"""What a LoRA file (or checkpoint) was made for, read from its keys, shapes and metadata.

Functions take {key: tensor} or {key: shape tuple}, so a file's safetensors header is enough
(`lora_file.read_header`) and nothing large is read to show an artist the file's details.

A family is one name ("SDXL", "Wan 14B") or, when a file fits several, names joined by " or "
("Flux or Chroma"): a LoRA trained only on attention layers may not say more. The frontend and
`families_compatible` warn only when the model's family is none of them. Sizes of one architecture
whose LoRAs cannot be swapped (SD3.5 Medium / Large; Wan 1.3B / 5B / 14B) are separate families;
an unexpected width is named with it ("Wan (width 64)"), the same for the model and its LoRAs.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from .files import metadata_json

UNKNOWN = "unknown"
FLUX, FLUX2, CHROMA, QWEN_IMAGE, HIDREAM = "Flux", "Flux.2", "Chroma", "Qwen-Image", "HiDream"
# Hidden width -> family, for architectures that come in sizes.
SD3_SIZES = {1536: "SD3.5 Medium", 2432: "SD3.5 Large"}  # SD3 Medium is 1536 wide too
WAN_SIZES = {1536: "Wan 1.3B", 3072: "Wan 5B", 5120: "Wan 14B"}  # 2.1 1.3B, 2.2 TI2V 5B, 2.1/2.2 14B
_FLUX1_WIDTH = 3072  # Flux.1 and Chroma (and Flux.2 Klein 4B)
_FLUX2_WIDTHS = {4096, 6144}  # Flux.2 Klein 9B, Flux.2 dev
_FLUX2_MAX_DOUBLE_BLOCKS = 8  # Flux.2 has at most 8 double blocks, Flux.1 and Chroma 19

# Metadata value patterns -> family names, first match wins (Chroma, Flux.2 and Qwen-Image before Flux).
_METADATA_FAMILIES = (
    (r"chroma", CHROMA), (r"flux[.\-_ ]?2", FLUX2), (r"flux", FLUX), (r"qwen[-_ ]?image", QWEN_IMAGE),
    (r"hidream", HIDREAM), (r"\bwan[-_ ]?2", "Wan"),
    (r"stable-diffusion-3\.5-large|sd3\.?5[-_ ]?l(arge)?\b", SD3_SIZES[2432]),
    (r"stable-diffusion-3(\.5)?-medium|sd3(\.?5)?[-_ ]?m(edium)?\b", SD3_SIZES[1536]),
    (r"stable-diffusion-3|sd3", "SD3.5"),
    (r"sdxl|stable-diffusion-xl", "SDXL"), (r"sd_v2|stable-diffusion-v2", "SD2"),
    (r"sd_v1|stable-diffusion-v1", "SD1.5"),
)
# Cross-attention context width -> UNet family.
_CONTEXT_FAMILIES = {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", "_lora.down.weight",
                  ".lora_linear_layer.down.weight", ".lora_A.default.weight")
_UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight", ".lora.up.weight", "_lora.up.weight",
                ".lora_linear_layer.up.weight", ".lora_B.default.weight")
# Where a key's module name ends for adapters without a down/up pair (LoHa, LoKr, full diffs, ...).
_OTHER_ADAPTER_PART = re.compile(r"\.(alpha|hada_\w+|lokr_\w+|diff|diff_b|dora_scale|lora_mid\.weight|oft_\w+|"
                                 r"w_norm|b_norm|set_weight|reshape_weight|weight|bias)$")
# Prefixes trainers put before the model's own layer names (diffusers/peft, kohya, OneTrainer,
# SimpleTuner's LyCORIS, ComfyUI's own `diffusion_model.`, Wan-Fun's `lora_unet__`).
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.", "unet.",
             "lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_")
_BLOCK = re.compile(r"^(single_transformer_blocks|transformer_blocks|double_blocks|single_blocks|joint_blocks|"
                    r"double_stream_blocks|single_stream_blocks|blocks)_(\d+)_(.+)$")
_WAN_LAYER = re.compile(r"^(self_attn|cross_attn|ffn)_|^attn[12]_to_(q|k|v|out)")
# Layers whose input is the model's hidden width (the down factor's second dimension): queries, fused
# qkv, output projections; not cross-attention keys and values, which read the text encoder's width.
_HIDDEN_INPUT = re.compile(r"(^|_)(to_q|add_q_proj|qkv|attn_proj|to_out_0|self_attn_[qo]|cross_attn_[qo])$|"
                           r"^(linear1|proj_mlp)$")
# Rows of the first MLP layer per hidden width: (Flux.1 and Chroma: GELU, 4x), (Flux.2: SwiGLU, 2 x 3x);
# a single block's linear1 also holds q, k and v.
_MLP_ROWS = {"img_mlp_0": (4, 6), "txt_mlp_0": (4, 6), "ff_net_0_proj": (4, 6), "linear1": (7, 9)}
_ORDER = ("SD1.5", "SD2", "SDXL", *SD3_SIZES.values(), FLUX, CHROMA, FLUX2, QWEN_IMAGE, HIDREAM, *WAN_SIZES.values())


def _join(families) -> str:
    ordered = sorted(set(families), key=lambda f: (_ORDER.index(f) if f in _ORDER else len(_ORDER), f))
    return " or ".join(ordered) if ordered else UNKNOWN


def alternatives(family: str) -> list[str]:
    """The families a family string allows ('Flux or Chroma' -> ['Flux', 'Chroma'])."""
    return family.split(" or ")


def sized_family(sizes: dict[int, str], base: str, width: int | None) -> str:
    """The size of an architecture from its hidden width; every size when the width is not known."""
    if width is None:
        return _join(sizes.values())
    return sizes.get(width, f"{base} (width {width})")


def sd3_family(width: int | None) -> str:
    return sized_family(SD3_SIZES, "SD3.5", width)


def wan_family(width: int | None) -> str:
    return sized_family(WAN_SIZES, "Wan", width)


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    for key in ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name"):
        value = (metadata.get(key) or "").lower()
        for pattern, family in _METADATA_FAMILIES:
            if re.search(pattern, value):
                if family == "Wan":
                    size = re.search(r"(1\.3|5|14)b", value)
                    return wan_family({"1.3": 1536, "5": 3072, "14": 5120}[size.group(1)] if size else None)
                return sd3_family(None) if family == "SD3.5" else family
    return None


def _shape(value) -> tuple:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def _strip_prefix(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _layers(tensors: dict) -> dict[str, dict]:
    """{normalised layer name: {'in': down input width, 'out': up output rows}} of a LoRA's keys.

    Names lose the trainer's prefix and use '_' for '.', so kohya's `lora_unet_double_blocks_0_img_attn_qkv`
    and peft's `transformer.double_blocks.0.img_attn.qkv` are the same layer.
    """
    layers: dict[str, dict] = {}
    for key, value in tensors.items():
        role = None
        for suffixes, part in ((_DOWN_SUFFIXES, "in"), (_UP_SUFFIXES, "out")):
            end = next((s for s in suffixes if key.endswith(s)), None)
            if end:
                module, role = key[: -len(end)], part
                break
        else:
            module = _OTHER_ADAPTER_PART.sub("", key)
        entry = layers.setdefault(_strip_prefix(module).replace(".", "_"), {})
        shape = _shape(value)
        if role == "in" and len(shape) >= 2:
            entry["in"] = shape[1]
        elif role == "out" and len(shape) >= 1:
            entry["out"] = shape[0]
    return layers


def _blocks(layers: dict) -> list[tuple[str, int, str, dict]]:
    """(block kind, index, layer inside the block, widths) for the layers inside numbered blocks."""
    found = []
    for name, widths in layers.items():
        match = _BLOCK.match(name)
        if match:
            found.append((match.group(1), int(match.group(2)), match.group(3), widths))
    return found


def _hidden_width(blocks) -> int | None:
    widths = Counter(w["in"] for _, _, inner, w in blocks if "in" in w and _HIDDEN_INPUT.search(inner))
    return widths.most_common(1)[0][0] if widths else None


def _flux_like(layers: dict, blocks, width: int | None) -> set[str]:
    """Flux.1, Chroma or Flux.2 (double/single blocks): told apart by per-block modulation (Flux.1 only),
    the distilled guidance layer (Chroma), shared stream modulation, widths and MLP sizes (Flux.2)."""
    names = "\n".join(layers)
    candidates = {FLUX2} if width in _FLUX2_WIDTHS else {FLUX, CHROMA, FLUX2}
    if re.search(r"_(img_mod|txt_mod)_lin|^single_blocks_\d+_modulation_lin|_norm1(_context)?_linear|"
                 r"^single_transformer_blocks_\d+_norm_linear|^(time_in|vector_in|guidance_in|time_text_embed)_",
                 names, re.M):
        candidates &= {FLUX}
    if "distilled_guidance_layer" in names:
        candidates &= {CHROMA}
    # diffusers' Flux.2 fuses a single block's q, k, v and MLP (to_qkv_mlp_proj) and names its MLPs linear_in/out
    if re.search(r"(double|single)_stream_modulation|to_qkv_mlp_proj|_ff(_context)?_linear_(in|out)$", names, re.M):
        candidates &= {FLUX2}
    if re.search(r"^single_transformer_blocks_\d+_attn_to_[qkv]$|_ff(_context)?_net_|proj_mlp", names, re.M):
        candidates.discard(FLUX2)
    for _, _, inner, w in blocks:  # these layers read the hidden width: rows / input width is the MLP ratio
        if inner in _MLP_ROWS and "out" in w and w.get("in"):
            flux1, flux2 = _MLP_ROWS[inner]
            if w["out"] == flux1 * w["in"]:
                candidates.discard(FLUX2)
            elif w["out"] == flux2 * w["in"]:
                candidates &= {FLUX2}
    if any(kind in ("double_blocks", "transformer_blocks") and index >= _FLUX2_MAX_DOUBLE_BLOCKS
           for kind, index, _, _ in blocks):
        candidates.discard(FLUX2)
    return candidates or {FLUX}


def _transformer_blocks(layers: dict, blocks, width: int | None) -> set[str]:
    """diffusers-named joint DiTs (`transformer_blocks.N.attn.to_q`): SD3.5, Qwen-Image or a Flux-like model."""
    inner = [i for kind, _, i, _ in blocks if kind == "transformer_blocks"]
    if any(i.startswith(("img_mlp_", "txt_mlp_", "img_mod_", "txt_mod_")) for i in inner):
        return {QWEN_IMAGE}
    joint = any(i.startswith(("attn_", "ff_", "norm1_")) for i in inner)  # PixArt, LTXV, CogVideoX: attn1/attn2
    if not joint and not any(k == "single_transformer_blocks" for k, _, _, _ in blocks):
        return set()
    if width in SD3_SIZES or any(i.startswith("attn2_") for i in inner):  # SD3.5 Medium's second self-attention
        return {sd3_family(width)}
    flux = _flux_like(layers, blocks, width)
    if any(k == "single_transformer_blocks" for k, _, _, _ in blocks) or \
            any(i.startswith(("ff_", "ff_context_", "norm1_")) for i in inner):
        return flux
    deepest = max((index for kind, index, _, _ in blocks if kind == "transformer_blocks"), default=0)
    if deepest >= 19:  # Qwen-Image has 60 blocks, Flux.1/Chroma 19 double blocks
        return {QWEN_IMAGE}
    if width in _FLUX2_WIDTHS:
        return flux
    return flux | {QWEN_IMAGE}


def _dit_family(tensors: dict) -> str | None:
    layers = _layers(tensors)
    blocks = _blocks(layers)
    if not blocks:
        return CHROMA if any(n.startswith("distilled_guidance_layer") for n in layers) else None
    kinds = {kind for kind, _, _, _ in blocks}
    width = _hidden_width(blocks)
    if kinds & {"double_stream_blocks", "single_stream_blocks"}:
        return HIDREAM
    if "joint_blocks" in kinds:
        return sd3_family(width)
    if "blocks" in kinds and any(_WAN_LAYER.search(i) for k, _, i, _ in blocks if k == "blocks"):
        return wan_family(width)
    if kinds & {"double_blocks", "single_blocks"}:
        return _join(_flux_like(layers, blocks, width))
    if kinds & {"transformer_blocks", "single_transformer_blocks"}:
        return _join(_transformer_blocks(layers, blocks, width))
    return None


def family_from_keys(tensors: dict) -> str:
    """Best guess of the base-model family from key names and layer widths."""
    dit = _dit_family(tensors)
    if dit:
        return dit
    keys = list(tensors)
    joined = "\n".join(keys)
    for key in keys:
        if ("attn2_to_k" in key or "attn2.to_k" in key) and key.endswith(_DOWN_SUFFIXES):
            shape = _shape(tensors[key])
            width = shape[1] if len(shape) >= 2 else 0
            if width in _CONTEXT_FAMILIES:
                return _CONTEXT_FAMILIES[width]
    if "lora_te2_" in joined or "text_encoder_2" in joined:
        return "SDXL"
    unet = re.search(r"input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block", joined)
    if "lora_te_" in joined or (unet and ("lora_unet_" in joined or "unet." in joined)):
        return "SD1.5 or SDXL"
    return UNKNOWN


def lora_family(tensors: dict, metadata: dict[str, str]) -> str:
    """The family a LoRA was made for: its metadata, narrowed by its keys where they say more
    (a Wan size); the keys alone without metadata."""
    from_keys = family_from_keys(tensors)
    from_metadata = family_from_metadata(metadata)
    if from_metadata is None:
        return from_keys
    architectures = {_architecture(f) for f in alternatives(from_metadata)}  # 'Wan 14B' -> 'Wan'
    both = [f for f in alternatives(from_keys) if _architecture(f) in architectures]
    return _join(both) if both else from_metadata


def _architecture(family: str) -> str:
    """A family without its size: 'Wan 14B', 'Wan (width 64)' -> 'Wan'; 'SD3.5 Large' -> 'SD3.5'."""
    return family.split(" ")[0]


def lora_rank(tensors: dict) -> int | None:
    """The most common rank among the file's down factors (None for non-LoRA adapters)."""
    ranks = Counter(_shape(t)[0] for k, t in tensors.items() if k.endswith(_DOWN_SUFFIXES))
    return ranks.most_common(1)[0][0] if ranks else None


def trigger_words(metadata: dict[str, str], limit: int = 8) -> list[str]:
    """Trigger words: modelspec's trigger phrase, else kohya's most frequent training tags."""
    phrase = metadata.get("modelspec.trigger_phrase")
    if phrase:
        return [w.strip() for w in phrase.split(",") if w.strip()][:limit]
    frequencies = metadata_json(metadata, "ss_tag_frequency")
    if not isinstance(frequencies, dict):
        return []
    counts: Counter = Counter()
    for tags in frequencies.values():
        if isinstance(tags, dict):
            counts.update({str(tag).strip(): int(n) for tag, n in tags.items() if isinstance(n, (int, float))})
    return [tag for tag, _ in counts.most_common(limit) if tag]


def _width(tensors: dict, *keys: str, dim: int = 1) -> int | None:
    for key in keys:
        if key in tensors:
            shape = _shape(tensors[key])
            if len(shape) > dim:
                return shape[dim]
    return None


def checkpoint_family(tensors: dict) -> str:
    """Family of a checkpoint or diffusion-model file (ComfyUI's or diffusers' layout) from its keys and widths."""
    prefixes = ("model.diffusion_model.", "diffusion_model.")
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in tensors)), "")
    model = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    joined = "\n".join(model)
    if "double_stream_blocks." in joined:
        return HIDREAM
    if "joint_blocks." in joined:
        return sd3_family(_width(model, "joint_blocks.0.x_block.attn.qkv.weight")
                          or _width(model, "x_embedder.proj.weight", dim=0))
    if "double_blocks." in joined or "single_transformer_blocks." in joined:
        if "distilled_guidance_layer" in joined:
            return CHROMA
        return FLUX2 if "double_stream_modulation" in joined else FLUX
    if "txt_norm.weight" in model and "img_mlp" in joined:
        return QWEN_IMAGE
    if "blocks.0.self_attn.q.weight" in model or "blocks.0.attn1.to_q.weight" in model:
        return wan_family(_width(model, "blocks.0.self_attn.q.weight", "blocks.0.attn1.to_q.weight"))
    if "transformer_blocks.0.attn.add_q_proj.weight" in model:  # diffusers SD3 / SD3.5
        return sd3_family(_width(model, "transformer_blocks.0.attn.to_q.weight"))
    for key, value in model.items():
        if key.endswith("attn2.to_k.weight") and "input_blocks" in key:
            shape = _shape(value)
            if len(shape) == 2 and shape[1] in _CONTEXT_FAMILIES:
                return _CONTEXT_FAMILIES[shape[1]]
    return UNKNOWN


def families_overlap(first: str, second: str) -> bool:
    """Whether two LoRAs can be for one model: False only when both families are known and share no
    alternative ('SD1.5 or SDXL' and 'SDXL' overlap)."""
    return UNKNOWN in (first, second) or bool(set(alternatives(first)) & set(alternatives(second)))


def families_compatible(lora: str, model: str) -> bool:
    """False only when both are known and the model's family is none of the LoRA's ('Flux or Chroma'
    is compatible with either). The frontend's `compatible()` in web/js/plora.js is the same rule."""
    if UNKNOWN in (lora, model):
        return True
    return model in alternatives(lora)
