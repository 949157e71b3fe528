"""What a LoRA file (or checkpoint) was made for, read from its keys, shapes and metadata.

Functions take {key: tensor} or {key: shape tuple}, so a file's safetensors header is enough
(`lora_file.read_header`) and nothing large is read to show an artist the file's details.
"""

from __future__ import annotations

from collections import Counter

import torch

from .lora_file import metadata_json

# Substrings of metadata values -> family names shown to the user.
_METADATA_FAMILIES = (
    ("flux", "Flux"), ("sd3", "SD3"), ("stable-diffusion-3", "SD3"), ("sdxl", "SDXL"),
    ("stable-diffusion-xl", "SDXL"), ("sd_v2", "SD2"), ("stable-diffusion-v2", "SD2"),
    ("sd_v1", "SD1.5"), ("stable-diffusion-v1", "SD1.5"),
)
# Cross-attention context width -> UNet family.
_CONTEXT_FAMILIES = {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", "_lora.down.weight",
                  ".lora_linear_layer.down.weight")


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    for key in ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name"):
        value = (metadata.get(key) or "").lower()
        for needle, family in _METADATA_FAMILIES:
            if needle in value:
                return family
    return None


def _shape(value) -> tuple:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def family_from_keys(tensors: dict) -> str:
    """Best guess of the base-model family from key names and cross-attention widths."""
    keys = list(tensors)
    joined = "\n".join(keys)
    if any(s in joined for s in ("double_blocks", "single_blocks", "single_transformer_blocks")):
        return "Flux"
    if "joint_blocks" in joined or "context_block" in joined:
        return "SD3"
    dit = _dit_family_from_width(tensors)
    if dit:
        return dit
    for key in keys:
        if ("attn2_to_k" in key or "attn2.to_k" in key) and key.endswith(_DOWN_SUFFIXES):
            shape = _shape(tensors[key])
            width = shape[1] if len(shape) >= 2 else 0
            if width in _CONTEXT_FAMILIES:
                return _CONTEXT_FAMILIES[width]
    if "lora_te2_" in joined or "text_encoder_2" in joined:
        return "SDXL"
    if "lora_te_" in joined or "lora_unet_" in joined or "unet." in joined:
        return "SD1.5 or SDXL"
    return "unknown"


# Hidden width of a diffusers-named DiT's attention (`transformer_blocks.N.attn.to_q`) -> family:
# Flux 3072; SD3 medium 1536, SD3.5 large 2432. A Flux LoRA on double blocks only has no
# `single_transformer_blocks` key to go by.
_DIT_WIDTHS = {3072: "Flux", 1536: "SD3", 2432: "SD3"}


def _dit_family_from_width(tensors: dict) -> str | None:
    for key in tensors:
        if "transformer_blocks" in key and ("attn.to_q" in key or "attn_to_q" in key) \
                and key.endswith(_DOWN_SUFFIXES):
            shape = _shape(tensors[key])
            if len(shape) >= 2 and shape[1] in _DIT_WIDTHS:
                return _DIT_WIDTHS[shape[1]]
    return None


def lora_family(tensors: dict, metadata: dict[str, str]) -> str:
    """The family a LoRA was made for: metadata first, then its keys."""
    return family_from_metadata(metadata) or family_from_keys(tensors)


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


def checkpoint_family(tensors: dict) -> str:
    """Family of a checkpoint or diffusion-model file from its keys and cross-attention width."""
    keys = list(tensors)
    joined = "\n".join(keys)
    if "double_blocks." in joined and "single_blocks." in joined:
        return "Flux"
    if "joint_blocks." in joined:
        return "SD3"
    for key in keys:
        if key.endswith("attn2.to_k.weight") and "input_blocks" in key:
            shape = _shape(tensors[key])
            if len(shape) == 2 and shape[1] in _CONTEXT_FAMILIES:
                return _CONTEXT_FAMILIES[shape[1]]
    return "unknown"


def families_compatible(lora: str, model: str) -> bool:
    """False only when both are known and differ ('SD1.5 or SDXL' is compatible with either)."""
    if "unknown" in (lora, model):
        return True
    return model in lora.split(" or ")
