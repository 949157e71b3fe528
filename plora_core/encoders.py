"""Image encoders for the posterior metrics, E_CLIP and E_DINO of Eq. 16-18, loaded from local files.

- CLIP: an open_clip architecture name plus a checkpoint file (OpenAI `.pt`, TorchScript or
  state dict; open_clip/LAION `.safetensors`, `.bin`, `.pt`, `.pth`).
- DINO: a local Hugging Face folder holding a DINO v1 ViT (model_type "vit") or a DINOv2.

Every encoder takes [B, 3, H, W] pixels in [0, 1], preprocesses them differentiably, and returns
[B, D] float32 embeddings (not normalised). Models are built under `torch.inference_mode(False)`
with frozen parameters, so a caller may load them inside ComfyUI's inference mode and still
backpropagate to the pixels later. Loaded encoders are cached at module level, keyed by path,
modification time, architecture, device and dtype. Nothing here downloads.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from .image_preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess

logger = logging.getLogger("plora")

_CACHE_ENTRIES = 4
_cache: OrderedDict[tuple, ImageEncoder] = OrderedDict()

DINO_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")
# Entries of OpenAI's TorchScript state dict that are not weights.
_OPENAI_JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")


class EncoderLoadError(ValueError):
    """An encoder file or folder that cannot be used; the message names it and what to do."""


class ImageEncoder:
    """An image tower with its preprocessing: [B, 3, H, W] in [0, 1] -> [B, D] float32."""

    def __init__(self, name: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 resize_size: int | None = None):
        self.name = name
        self.image_size = int(image_size)
        self.resize_size = int(resize_size or image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.device = torch.device(device)
        self.dtype = dtype

    def embed(self, images_nchw_01: torch.Tensor) -> torch.Tensor:
        """E(x): differentiable with respect to the pixels when grad is enabled. [B, D] float32."""
        if images_nchw_01.ndim != 4 or images_nchw_01.shape[1] != 3:
            raise ValueError(
                f"{self.name} expects [B, 3, H, W] images in [0, 1], got shape {tuple(images_nchw_01.shape)}; "
                "convert ComfyUI IMAGE tensors with image_preprocess.to_nchw."
            )
        pixels = preprocess(images_nchw_01.to(self.device), self.image_size, self.mean, self.std,
                            self.resize_size)  # [B, 3, S, S] float32
        return self.features(pixels.to(self.dtype)).float()  # [B, D]

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] -> [B, D]; subclasses run their model here."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, size={self.image_size}, {self.device}, {self.dtype})"


class OpenClipImageEncoder(ImageEncoder):
    """E_CLIP: `model.encode_image` of an open_clip model (unnormalised image embedding)."""

    def __init__(self, model: torch.nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)  # [B, D]


class DinoImageEncoder(ImageEncoder):
    """E_DINO: the CLS token of the last hidden state, after the final layer norm (DINO's metric).

    For DINOv2 this equals `pooler_output`; for ViT it is what `add_pooling_layer=False` models give.
    """

    def __init__(self, model: torch.nn.Module, interpolate_pos_encoding: bool, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.forward_kwargs = {"interpolate_pos_encoding": True} if interpolate_pos_encoding else {}

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=pixels, **self.forward_kwargs).last_hidden_state  # [B, 1 + N, C]
        return hidden[:, 0]  # [B, C]


def clear_encoder_cache() -> None:
    """Forget every cached encoder (frees their memory once no caller holds them)."""
    _cache.clear()


def _cached(key: tuple, build: Callable[[], ImageEncoder]) -> ImageEncoder:
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    encoder = build()
    _cache[key] = encoder
    while len(_cache) > _CACHE_ENTRIES:
        _cache.popitem(last=False)
    return encoder


def _freeze(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------- open_clip


def load_open_clip_encoder(architecture: str, checkpoint_path: str, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32, pretrained_tag: str | None = None) -> ImageEncoder:
    """E_CLIP of Eq. 16-17 from an open_clip architecture name and a local checkpoint file.

    `pretrained_tag` (e.g. "openai", "laion2b_s32b_b82k") names what the file was published as, only to
    take that tag's mean/std and QuickGELU setting from open_clip's table; nothing is downloaded.
    OpenAI TorchScript archives always load with QuickGELU; for OpenAI weights saved as a plain state
    dict, name the "-quickgelu" architecture or pretrained_tag="openai", else the embeddings are off.
    """
    path = os.path.abspath(os.fspath(checkpoint_path))
    if not os.path.isfile(path):
        raise EncoderLoadError(
            f"CLIP checkpoint {path} not found; put the open_clip/OpenAI image-text checkpoint file there "
            "(e.g. open_clip_pytorch_model.bin, open_clip_model.safetensors or ViT-B-32.pt)."
        )
    key = ("open_clip", path, os.path.getmtime(path), architecture, pretrained_tag, str(torch.device(device)), dtype)
    return _cached(key, lambda: _build_open_clip(architecture, path, device, dtype, pretrained_tag))


def _build_open_clip(architecture: str, path: str, device, dtype, pretrained_tag: str | None) -> ImageEncoder:
    import open_clip

    if open_clip.get_model_config(architecture) is None:
        close = difflib.get_close_matches(architecture, open_clip.list_models(), n=5)
        raise EncoderLoadError(
            f"Unknown open_clip architecture {architecture!r} for CLIP checkpoint {path}; "
            f"use a name from open_clip.list_models(){', e.g. ' + ', '.join(close) if close else ''}."
        )
    tag_cfg = _open_clip_tag_config(open_clip, architecture, pretrained_tag, path)
    torchscript = _is_torchscript_archive(path)
    quick_gelu = torchscript or bool(tag_cfg.get("quick_gelu"))
    preprocess_cfg = {k: tag_cfg[k] for k in ("mean", "std") if tag_cfg.get(k) is not None}
    with torch.inference_mode(False):
        try:
            if torchscript:
                model = _open_clip_from_torchscript(open_clip, architecture, path, preprocess_cfg)
            else:
                model = open_clip.create_model(
                    architecture, pretrained=path, precision="fp32", device="cpu", force_quick_gelu=quick_gelu,
                    force_preprocess_cfg=preprocess_cfg, pretrained_image=False, pretrained_text=False,
                )
        except Exception as err:  # open_clip raises RuntimeError, AssertionError, KeyError... on a wrong file
            raise EncoderLoadError(
                f"CLIP checkpoint {path} does not fit open_clip architecture {architecture!r} ({err}); "
                "pick the architecture the file was trained as (e.g. ViT-L-14 for OpenAI ViT-L/14)."
            ) from err
        model = _freeze(model, device, dtype)
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise EncoderLoadError(f"CLIP checkpoint {path}: non-square input size {size} is not supported.")
        size = size[0]
    logger.info("Loaded CLIP image encoder %s from %s (size %s, mean %s, std %s, quick_gelu %s)",
                architecture, path, size, cfg["mean"], cfg["std"], quick_gelu)
    return OpenClipImageEncoder(model, name=f"open_clip {architecture} ({os.path.basename(path)})",
                                image_size=size, mean=cfg["mean"], std=cfg["std"], device=device, dtype=dtype)


def _open_clip_tag_config(open_clip, architecture: str, pretrained_tag: str | None, path: str) -> dict:
    """The named tag's config, else the mean/std every known tag of this architecture agrees on."""
    tags = open_clip.list_pretrained_tags_by_model(architecture)
    if pretrained_tag is not None:
        if pretrained_tag not in tags:
            raise EncoderLoadError(
                f"open_clip knows no pretrained tag {pretrained_tag!r} for {architecture} (CLIP checkpoint {path}); "
                f"use one of {tags} or leave the tag empty."
            )
        return dict(open_clip.get_pretrained_cfg(architecture, pretrained_tag))
    stats = {(tuple(cfg.get("mean") or ()), tuple(cfg.get("std") or ()))
             for cfg in (open_clip.get_pretrained_cfg(architecture, tag) for tag in tags)}
    if len(stats) == 1:
        mean, std = stats.pop()
        return {"mean": mean or None, "std": std or None}
    if stats:
        logger.info("open_clip tags of %s use different mean/std; using the model default for %s "
                    "(name the pretrained tag to choose)", architecture, path)
    return {}


def _is_torchscript_archive(path: str) -> bool:
    """OpenAI's original `.pt` files are TorchScript archives (a zip holding constants.pkl)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name == "constants.pkl" or name.endswith("/constants.pkl") for name in archive.namelist())


def _open_clip_from_torchscript(open_clip, architecture: str, path: str, preprocess_cfg: dict) -> torch.nn.Module:
    """Build the named architecture with QuickGELU (as OpenAI trained) and load the archive's weights strictly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated but is the only reader
        state_dict = dict(torch.jit.load(path, map_location="cpu").state_dict())
    model = open_clip.create_model(architecture, pretrained=None, precision="fp32", device="cpu",
                                   force_quick_gelu=True, force_preprocess_cfg=preprocess_cfg,
                                   pretrained_image=False, pretrained_text=False)
    persistent = model.state_dict().keys()
    non_persistent = {name for name, _ in model.named_buffers() if name not in persistent}
    for key in [*_OPENAI_JIT_EXTRAS, *non_persistent]:
        state_dict.pop(key, None)
    model.load_state_dict(state_dict, strict=True)
    return model


# ---------------------------------------------------------------- DINO (transformers)


def load_dino_encoder(folder: str, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """E_DINO of Eq. 18 from a local Hugging Face folder (DINO v1 ViT, e.g. dino-vits16, or DINOv2)."""
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise EncoderLoadError(
            f"DINO folder {folder} not found; download a DINO model folder (config.json, model.safetensors, "
            "preprocessor_config.json; e.g. facebook/dino-vits16 or facebook/dinov2-small) to that path."
        )
    model_type = _hf_model_type(folder)
    key = ("dino", folder, _folder_mtime(folder), model_type, str(torch.device(device)), dtype)
    return _cached(key, lambda: _build_dino(folder, model_type, device, dtype))


def _hf_model_type(folder: str) -> str:
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise EncoderLoadError(f"DINO folder {folder} has no config.json; point to a Hugging Face model folder.")
    with open(config_path, encoding="utf-8") as handle:
        model_type = json.load(handle).get("model_type")
    if model_type not in DINO_MODEL_TYPES:
        raise EncoderLoadError(
            f"DINO folder {folder} holds a {model_type!r} model, not a DINO/ViT image model "
            f"(model_type one of {DINO_MODEL_TYPES}); use e.g. facebook/dino-vits16 or facebook/dinov2-small."
        )
    return model_type


def _folder_mtime(folder: str) -> float:
    entries = (os.path.join(folder, name) for name in os.listdir(folder))
    return max((os.path.getmtime(p) for p in entries if os.path.isfile(p)), default=os.path.getmtime(folder))


def _build_dino(folder: str, model_type: str, device, dtype) -> ImageEncoder:
    from transformers import AutoModel

    extra = {"add_pooling_layer": False} if model_type == "vit" else {}  # DINO checkpoints have no pooler
    with torch.inference_mode(False):
        try:
            model, info = AutoModel.from_pretrained(folder, local_files_only=True, output_loading_info=True, **extra)
        except (OSError, RuntimeError, ValueError) as err:
            raise EncoderLoadError(
                f"DINO folder {folder} could not be loaded ({err}); it needs config.json and matching weights "
                "(model.safetensors or pytorch_model.bin)."
            ) from err
        missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
        if missing:
            raise EncoderLoadError(
                f"DINO folder {folder}: weights missing for {missing[:5]} ({len(missing)} in all); "
                "the weights file does not match config.json."
            )
        model = _freeze(model, device, dtype)
    size, resize_size, mean, std = _dino_preprocess_settings(folder)
    model_size = getattr(model.config, "image_size", size)
    interpolate = model_type == "vit" and model_size != size  # DINOv2 always interpolates
    logger.info("Loaded DINO image encoder %s from %s (crop %s, resize %s, mean %s, std %s)",
                model_type, folder, size, resize_size, mean, std)
    return DinoImageEncoder(model, interpolate, name=f"{model_type} ({os.path.basename(folder)})", image_size=size,
                            resize_size=resize_size, mean=mean, std=std, device=device, dtype=dtype)


def _edge(value) -> int | None:
    """A processor size entry (int, {"shortest_edge"} or {"height", "width"}) as one edge length."""
    if value is None or isinstance(value, int):
        return value
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    return int(min(value["height"], value["width"]))


def _dino_preprocess_settings(folder: str) -> tuple[int, int, tuple, tuple]:
    """(crop size, shorter-side resize, mean, std) from preprocessor_config.json, else 224 and ImageNet stats."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        logger.info("DINO folder %s has no preprocessor_config.json; using 224 px and ImageNet mean/std", folder)
        return 224, 224, IMAGENET_MEAN, IMAGENET_STD
    with open(path, encoding="utf-8") as handle:
        cfg = json.load(handle)
    mean = tuple(cfg.get("image_mean") or IMAGENET_MEAN)
    std = tuple(cfg.get("image_std") or IMAGENET_STD)
    crop = _edge(cfg.get("crop_size")) if cfg.get("do_center_crop", True) else None
    resize = _edge(cfg.get("size")) if cfg.get("do_resize", True) else None
    size = crop or resize or 224
    return size, max(resize or size, size), mean, std
