"""Image encoders for the posterior metrics, E_CLIP and E_DINO of Eq. 16-18, loaded from local files.

- CLIP: an open_clip architecture name plus a checkpoint file (open_clip/LAION `.safetensors`/`.sft`,
  `.bin`, `.pt`, `.pth`; OpenAI `.pt`, TorchScript or state dict). Only the image tower is built
  and kept: the text tower is never made.
- DINO: a local Hugging Face folder holding a DINO v1 ViT (model_type "vit") or a DINOv2.

Files are read safely: only regular files (no FIFOs, devices or directories), safetensors through
safetensors, pickles only through `torch.load(weights_only=True)`, and OpenAI's TorchScript archives
by a reader that takes their tensors without running any code from the file (never `torch.jit.load`).

Every encoder takes [B, 3, H, W] pixels in [0, 1], preprocesses them differentiably, and returns
[B, D] float32 embeddings (not normalised). Models are built under `torch.inference_mode(False)`
with frozen parameters, so a caller may load them inside ComfyUI's inference mode and still
backpropagate to the pixels later. Loaded encoders are cached at module level, keyed by path,
modification time, architecture, device and dtype, up to `ENCODER_CACHE.limit` bytes of weights;
ComfyUI's "unload models" empties the cache and moves live encoders off the GPU (`release_encoders`).
Nothing here downloads.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pickle
import stat
import weakref
import zipfile
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .image_preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess
from .files import (file_kind, is_torchscript_archive, is_utf8_path, read_safetensors_bytes, regular_file_stat, scrub,
                    shown_name)
from .sized_cache import GIB, SizedCache

logger = logging.getLogger("plora")

DINO_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")
# Entries of OpenAI's TorchScript state dict that are not weights.
_OPENAI_JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")


class EncoderLoadError(ValueError):
    """An encoder file or folder that cannot be used; the message names it and what to do."""

    __module__ = "plora"  # ComfyUI reports module + class name; the pack's install path stays out of /history


class ImageEncoder:
    """An image tower with its preprocessing: [B, 3, H, W] in [0, 1] -> [B, D] float32.

    Subclasses keep their network in `self.model`; `offload()` moves it to the CPU (ComfyUI
    unloading models) and the next `embed` brings it back to `device`.
    """

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
        self.offloaded = False
        _live_encoders.add(self)

    def embed(self, images_nchw_01: torch.Tensor) -> torch.Tensor:
        """E(x): differentiable with respect to the pixels when grad is enabled. [B, D] float32."""
        if images_nchw_01.ndim != 4 or images_nchw_01.shape[1] != 3:
            raise ValueError(
                f"{self.name} expects [B, 3, H, W] images in [0, 1], got shape {tuple(images_nchw_01.shape)}; "
                "convert ComfyUI IMAGE tensors with image_preprocess.to_nchw."
            )
        if self.offloaded:
            self._move(self.device)
        pixels = preprocess(images_nchw_01.to(self.device), self.image_size, self.mean, self.std,
                            self.resize_size)  # [B, 3, S, S] float32
        return self.features(pixels.to(self.dtype)).float()  # [B, D]

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] -> [B, D]; subclasses run their model here."""
        raise NotImplementedError

    def nbytes(self) -> int:
        model = getattr(self, "model", None)
        if not isinstance(model, torch.nn.Module):
            return 0
        return sum(t.nbytes for t in (*model.parameters(), *model.buffers()))

    def offload(self) -> None:
        """Move the network to the CPU, freeing accelerator memory until the next `embed`."""
        if self.device.type != "cpu" and not self.offloaded:
            self._move(torch.device("cpu"))
            self.offloaded = True

    def _move(self, device: torch.device) -> None:
        model = getattr(self, "model", None)
        if isinstance(model, torch.nn.Module):
            with torch.inference_mode(False):  # keep normal (backward-capable) tensors
                model.to(device)
        self.offloaded = device != self.device

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, size={self.image_size}, {self.device}, {self.dtype})"


_live_encoders: weakref.WeakSet[ImageEncoder] = weakref.WeakSet()
ENCODER_CACHE = SizedCache(2 * GIB, lambda encoder: encoder.nbytes())


class OpenClipImageEncoder(ImageEncoder):
    """E_CLIP: the image tower of an open_clip model (`model.encode_image` unnormalised = `visual(x)`)."""

    def __init__(self, model: torch.nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.model = model  # open_clip's `visual` tower only

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)  # [B, D]


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
    ENCODER_CACHE.clear()


def release_encoders() -> None:
    """ComfyUI unloads models: empty the cache and move every live encoder off the accelerator.

    Encoders that node outputs still hold come back to their device at their next use.
    """
    ENCODER_CACHE.clear()
    for encoder in list(_live_encoders):
        encoder.offload()


def _cached(key: tuple, build) -> ImageEncoder:
    encoder = ENCODER_CACHE.get(key)
    if encoder is None:
        encoder = ENCODER_CACHE.put(key, build())
    return encoder


def _freeze(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------- open_clip


def load_open_clip_encoder(architecture: str, checkpoint_path: str, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32, pretrained_tag: str | None = None,
                           label: str | None = None) -> ImageEncoder:
    """E_CLIP of Eq. 16-17 from an open_clip architecture name and a local checkpoint file.

    `pretrained_tag` (e.g. "openai", "laion2b_s32b_b82k") names what the file was published as, only to
    take that tag's mean/std and QuickGELU setting from open_clip's table; nothing is downloaded.
    OpenAI TorchScript archives always load with QuickGELU; for OpenAI weights saved as a plain state
    dict, name the "-quickgelu" architecture or pretrained_tag="openai", else the embeddings are off.
    `label` is the name messages use (the name in models/open_clip); by default the file name.
    """
    path = os.path.abspath(os.fspath(checkpoint_path))
    label = label or shown_name(os.path.basename(path))
    info = regular_file_stat(path)
    if info is None:
        raise EncoderLoadError(
            f"CLIP checkpoint {label} not found (or not a regular file); put the open_clip/OpenAI image-text "
            "checkpoint file in models/open_clip (e.g. open_clip_model.safetensors or ViT-B-32.pt)."
        )
    if file_kind(path) is None:
        raise EncoderLoadError(f"CLIP checkpoint {label} is not a .safetensors, .sft, .pt, .pth, .ckpt or .bin file.")
    key = ("open_clip", path, info.st_mtime_ns, info.st_size, architecture, pretrained_tag,
           str(torch.device(device)), dtype)
    return _cached(key, lambda: _build_open_clip(architecture, path, label, device, dtype, pretrained_tag))


def _build_open_clip(architecture: str, path: str, label: str, device, dtype,
                     pretrained_tag: str | None) -> ImageEncoder:
    import open_clip

    if not isinstance(architecture, str) or architecture not in open_clip.list_models() \
            or open_clip.get_model_config(architecture) is None:
        close = difflib.get_close_matches(str(architecture), open_clip.list_models(), n=5)
        raise EncoderLoadError(
            f"Unknown open_clip architecture {shown_name(architecture)[:100]!r} for CLIP checkpoint {label}; "
            f"use a name from open_clip.list_models(){', e.g. ' + ', '.join(close) if close else ''}."
        )
    tag_cfg = _open_clip_tag_config(open_clip, architecture, pretrained_tag, label)
    torchscript = is_torchscript_archive(path)
    quick_gelu = torchscript or bool(tag_cfg.get("quick_gelu"))
    with torch.inference_mode(False):
        try:
            weights = _visual_weights(_read_clip_state_dict(path, label, torchscript), label)
            check_visual_shapes(open_clip, architecture, weights, label)  # before the (maybe huge) build
            visual = _open_clip_visual(open_clip, architecture, quick_gelu)
            _load_visual_weights(visual, weights)
        except EncoderLoadError:
            raise
        except Exception as err:  # open_clip/torch raise RuntimeError, KeyError, ... on a wrong file
            raise EncoderLoadError(
                f"CLIP checkpoint {label} does not fit open_clip architecture {architecture!r} "
                f"({scrub(str(err), path, label)}); pick the architecture the file was trained as "
                "(e.g. ViT-L-14 for OpenAI ViT-L/14)."
            ) from err
        visual = _freeze(visual, device, dtype)
    size = visual.image_size
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise EncoderLoadError(f"CLIP checkpoint {label}: non-square input size {size} is not supported.")
        size = size[0]
    mean = tag_cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN
    std = tag_cfg.get("std") or open_clip.OPENAI_DATASET_STD
    logger.info("Loaded CLIP image encoder %s from %s (size %s, mean %s, std %s, quick_gelu %s)",
                architecture, label, size, mean, std, quick_gelu)
    return OpenClipImageEncoder(visual, name=f"open_clip {architecture} ({label})", image_size=size, mean=mean,
                                std=std, device=device, dtype=dtype)


def _open_clip_visual(open_clip, architecture: str, quick_gelu: bool) -> torch.nn.Module:
    """The architecture's image tower alone (open_clip's own builder), random weights, float32 on the CPU."""
    from open_clip.model import _build_vision_tower  # the builder CLIP itself uses; stable since open_clip 2.0

    config = open_clip.get_model_config(architecture)
    return _build_vision_tower(config["embed_dim"], dict(config["vision_cfg"]),
                               quick_gelu=bool(config.get("quick_gelu")) or quick_gelu, cast_dtype=None)


def _visual_weights(state_dict: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """The checkpoint's `visual.*` tensors, named as in the image tower."""
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if state_dict and next(iter(state_dict)).startswith("module."):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    weights = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
    if not weights:
        raise EncoderLoadError(f"CLIP checkpoint {label} holds no image-tower ('visual.*') weights; pick an open_clip "
                               "or OpenAI CLIP checkpoint (image and text towers).")
    return weights


def vit_shape(config: dict) -> dict | None:
    """{width, layers, patch, embed_dim} of a plain open_clip ViT config (None for ResNet/timm towers)."""
    vision = config.get("vision_cfg") or {}
    layers, patch = vision.get("layers", 12), vision.get("patch_size", 16)
    if vision.get("timm_model_name") or not isinstance(layers, int) or not isinstance(patch, int):
        return None
    return {"width": vision.get("width", 768), "layers": layers, "patch": patch, "embed_dim": config.get("embed_dim")}


def checkpoint_vit_shape(weights: dict[str, torch.Tensor]) -> dict | None:
    """The same numbers read off a checkpoint's image-tower tensors (None when it is not a ViT tower)."""
    conv = weights.get("conv1.weight")
    if conv is None or conv.ndim != 4:
        return None
    blocks = {key.split(".")[2] for key in weights if key.startswith("transformer.resblocks.")}
    proj = weights.get("proj")
    return {"width": int(conv.shape[0]), "layers": len(blocks), "patch": int(conv.shape[-1]),
            "embed_dim": int(proj.shape[1]) if proj is not None and proj.ndim == 2 else None}


def _describe(shape: dict) -> str:
    return f"width {shape['width']}, {shape['layers']} layers, patch {shape['patch']}, embedding {shape['embed_dim']}"


def check_visual_shapes(open_clip, architecture: str, weights: dict[str, torch.Tensor], label: str) -> None:
    """Refuse a checkpoint whose ViT image tower is not the architecture's, from open_clip's model config
    alone: nothing is built, so choosing ViT-bigG-14 for a ViT-B-32 file costs no GBs."""
    expected = vit_shape(open_clip.get_model_config(architecture) or {})
    found = checkpoint_vit_shape(weights)
    if expected is None or found is None:
        return  # ResNet / timm towers: the strict load after the build names the mismatch
    if expected["embed_dim"] is None or found["embed_dim"] is None:
        expected, found = {**expected, "embed_dim": None}, {**found, "embed_dim": None}
    if expected == found:
        return
    known = {key: value for key, value in found.items() if value is not None}
    fitting = [name for name in open_clip.list_models()
               if (vit_shape(open_clip.get_model_config(name) or {}) or {}).items() >= known.items()]
    hint = f"architectures of that shape: {', '.join(fitting[:6])}" if fitting else \
        "no known architecture has that shape; put its <Name>.json open_clip config in models/open_clip"
    raise EncoderLoadError(
        f"CLIP checkpoint {label} does not fit open_clip architecture {architecture!r}: the file's image tower "
        f"has {_describe(found)}, {architecture} has {_describe(expected)}. Pick the architecture the file was "
        f"trained as ({hint})."
    )


def _load_visual_weights(visual: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """The checkpoint's image-tower tensors (`_visual_weights`) into the image tower, strictly."""
    weights = dict(weights)
    persistent = visual.state_dict().keys()
    for name, _ in visual.named_buffers():  # a TorchScript archive also stores non-persistent buffers
        if name not in persistent:
            weights.pop(name, None)
    visual.load_state_dict(weights, strict=True)


def _read_clip_state_dict(path: str, label: str, torchscript: bool) -> dict[str, torch.Tensor]:
    if file_kind(path) == "safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu") if is_utf8_path(path) else read_safetensors_bytes(path, label)
    if torchscript:
        state_dict = read_torchscript_tensors(path, label)
        for key in _OPENAI_JIT_EXTRAS:
            state_dict.pop(key, None)
        return state_dict
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise EncoderLoadError(f"CLIP checkpoint {label} holds a {type(data).__name__}, not a state dict.")
    return data


def _open_clip_tag_config(open_clip, architecture: str, pretrained_tag: str | None, label: str) -> dict:
    """The named tag's config, else the mean/std every known tag of this architecture agrees on."""
    tags = open_clip.list_pretrained_tags_by_model(architecture)
    if pretrained_tag is not None:
        if pretrained_tag not in tags:
            raise EncoderLoadError(
                f"open_clip knows no pretrained tag {pretrained_tag!r} for {architecture} (CLIP checkpoint {label}); "
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
                    "(name the pretrained tag to choose)", architecture, label)
    return {}


# ---------------------------------------------------------------- TorchScript archives, without running them

# Storage classes a TorchScript data.pkl names -> their dtypes.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for a `__torch__.*` module object: it only collects the attributes the pickle sets."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _identity(value):
    return value


def _rebuild_tensor(values, offset, size, stride, *_):
    return values.as_strided(tuple(size), tuple(stride), offset)


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Reads a TorchScript data.pkl: module objects become _ScriptObject, tensors are rebuilt from the
    archive's storages; any other global (code, callables) is refused."""

    _GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor, ("collections", "OrderedDict"): OrderedDict,
                **{("torch.jit._pickle", name): _identity
                   for name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist",
                                "build_tensor_from_id", "restore_type_tag")}}

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        import io

        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {})
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"global {module}.{name} is not a tensor or module attribute")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")
        raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        values = torch.frombuffer(raw, dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
        if values.numel() != numel:
            raise pickle.UnpicklingError(f"storage {key} holds {values.numel()} values, not {numel}")
        return values


def read_torchscript_tensors(path: str, label: str | None = None) -> dict[str, torch.Tensor]:
    """{dotted attribute path: tensor} of a TorchScript archive (e.g. OpenAI's CLIP .pt), read without
    torch.jit: no code from the file runs, only its tensors are taken."""
    label = label or os.path.basename(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            data_pkl = next((n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")), None)
            if data_pkl is None:
                raise EncoderLoadError(f"{label} is not a TorchScript archive with a data.pkl.")
            prefix = data_pkl.rsplit("/", 1)[0]
            byteorder = f"{prefix}/byteorder"
            if byteorder in names and archive.read(byteorder).strip() not in (b"", b"little"):
                raise EncoderLoadError(f"{label} was saved on a big-endian machine; convert it to .safetensors.")
            root = _TensorsOnlyUnpickler(archive.read(data_pkl), archive, prefix).load()
    except EncoderLoadError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError, TypeError, EOFError) as err:
        raise EncoderLoadError(f"TorchScript archive {label} could not be read as weights ({err}); "
                               "convert it to .safetensors.") from err
    tensors: dict[str, torch.Tensor] = {}

    def collect(obj, prefix: str) -> None:
        for attr, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + attr] = value
            elif isinstance(value, _ScriptObject):
                collect(value, f"{prefix}{attr}.")

    if isinstance(root, _ScriptObject):
        collect(root, "")
    return tensors


# ---------------------------------------------------------------- DINO (transformers)


def load_dino_encoder(folder: str, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32, label: str | None = None) -> ImageEncoder:
    """E_DINO of Eq. 18 from a local Hugging Face folder (DINO v1 ViT, e.g. dino-vits16, or DINOv2).

    The folder must be a directory of regular files (sub-folders are ignored; FIFOs, devices and
    sockets are refused before anything is opened). `label` is the name messages use.
    """
    folder = os.path.abspath(os.fspath(folder))
    label = label or shown_name(os.path.basename(folder))
    try:
        is_dir = stat.S_ISDIR(os.stat(folder).st_mode)
    except (OSError, ValueError):
        is_dir = False
    if not is_dir:
        raise EncoderLoadError(
            f"DINO folder {label} not found; download a DINO model folder (config.json, model.safetensors, "
            "preprocessor_config.json; e.g. facebook/dino-vits16 or facebook/dinov2-small) into models/dino."
        )
    if not is_utf8_path(folder):
        raise EncoderLoadError(f"DINO folder {label}: its name is not valid UTF-8 (the bytes shown escaped), which "
                               "the model reader cannot open; rename the folder in models/dino (e.g. to ASCII).")
    mtime = _check_folder_files(folder, label)
    model_type = _hf_model_type(folder, label)
    key = ("dino", folder, mtime, model_type, str(torch.device(device)), dtype)
    return _cached(key, lambda: _build_dino(folder, label, model_type, device, dtype))


def _check_folder_files(folder: str, label: str) -> float:
    """Refuse a folder holding anything but regular files and folders; the newest file time, for the cache key.

    The shards a weights index names must be plain file names of regular files in the folder.
    """
    newest = os.stat(folder).st_mtime
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        try:
            info = os.stat(path)
        except OSError:
            raise EncoderLoadError(f"DINO folder {label}: {shown_name(entry)} cannot be read (a broken "
                                   "link?).") from None
        if stat.S_ISREG(info.st_mode):
            newest = max(newest, info.st_mtime)
        elif not stat.S_ISDIR(info.st_mode):
            raise EncoderLoadError(f"DINO folder {label}: {shown_name(entry)} is not a regular file; remove it.")
        if entry.endswith(".index.json") and stat.S_ISREG(info.st_mode):
            with open(path, encoding="utf-8") as handle:
                shards = set((json.load(handle).get("weight_map") or {}).values())
            for shard in shards:
                if not isinstance(shard, str) or os.path.basename(shard) != shard \
                        or regular_file_stat(os.path.join(folder, shard)) is None:
                    raise EncoderLoadError(f"DINO folder {label}: {shown_name(entry)} names a weights file that is "
                                           "not in the folder; download the model folder again.")
    return newest


def _hf_model_type(folder: str, label: str) -> str:
    config_path = os.path.join(folder, "config.json")
    if regular_file_stat(config_path) is None:
        raise EncoderLoadError(f"DINO folder {label} has no config.json; point to a Hugging Face model folder.")
    try:
        with open(config_path, encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type")
    except (ValueError, AttributeError) as err:
        raise EncoderLoadError(f"DINO folder {label}: config.json is not a JSON object ({err}).") from err
    if model_type not in DINO_MODEL_TYPES:
        raise EncoderLoadError(
            f"DINO folder {label} holds a {model_type!r} model, not a DINO/ViT image model "
            f"(model_type one of {DINO_MODEL_TYPES}); use e.g. facebook/dino-vits16 or facebook/dinov2-small."
        )
    return model_type


def _build_dino(folder: str, label: str, model_type: str, device, dtype) -> ImageEncoder:
    from transformers import AutoModel

    extra = {"add_pooling_layer": False} if model_type == "vit" else {}  # DINO checkpoints have no pooler
    with torch.inference_mode(False):
        try:  # transformers reads .bin weights with torch.load(weights_only=True) and runs no remote code
            model, info = AutoModel.from_pretrained(folder, local_files_only=True, output_loading_info=True, **extra)
        except (OSError, RuntimeError, ValueError) as err:
            raise EncoderLoadError(
                f"DINO folder {label} could not be loaded ({scrub(str(err), folder, label)}); "
                "it needs config.json and matching weights (model.safetensors or pytorch_model.bin)."
            ) from err
        missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
        if missing:
            raise EncoderLoadError(
                f"DINO folder {label}: weights missing for {missing[:5]} ({len(missing)} in all); "
                "the weights file does not match config.json."
            )
        model = _freeze(model, device, dtype)
    size, resize_size, mean, std = _dino_preprocess_settings(folder)
    model_size = getattr(model.config, "image_size", size)
    interpolate = model_type == "vit" and model_size != size  # DINOv2 always interpolates
    logger.info("Loaded DINO image encoder %s from %s (crop %s, resize %s, mean %s, std %s)",
                model_type, label, size, resize_size, mean, std)
    return DinoImageEncoder(model, interpolate, name=f"{model_type} ({label})", image_size=size,
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
    if regular_file_stat(path) is None:
        logger.info("DINO folder %s has no preprocessor_config.json; using 224 px and ImageNet mean/std",
                    shown_name(os.path.basename(folder)))
        return 224, 224, IMAGENET_MEAN, IMAGENET_STD
    with open(path, encoding="utf-8") as handle:
        cfg = json.load(handle)
    mean = tuple(cfg.get("image_mean") or IMAGENET_MEAN)
    std = tuple(cfg.get("image_std") or IMAGENET_STD)
    crop = _edge(cfg.get("crop_size")) if cfg.get("do_center_crop", True) else None
    resize = _edge(cfg.get("size")) if cfg.get("do_resize", True) else None
    size = crop or resize or 224
    return size, max(resize or size, size), mean, std
