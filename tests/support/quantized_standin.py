"""A stand-in for ComfyUI's quantized weights (comfy-kitchen's QuantizedTensor: fp8, nvfp4, int8).

Like them it stays quantized under `.to(...)`, `clone()` and `detach()`, reports the shape and
dtype of the weight it stands for, dequantizes (int8 codes x per-row scale) for any other op,
and ignores in-place writes (they land on a temporary dequantized copy), so code that adds a
patch onto it without dequantizing first silently adds nothing.
"""

import torch

aten = torch.ops.aten
_KEPT_QUANTIZED = {aten._to_copy.default, aten.clone.default, aten.detach.default, aten.alias.default}


class QuantizedStandIn(torch.Tensor):
    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        out = torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype, device=codes.device)
        out.codes, out.scale = codes, scale
        return out

    def __init__(self, codes, scale, dtype):
        super().__init__()

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "QuantizedStandIn":
        """int8 codes with one scale per output row."""
        flat = weight.detach().float().reshape(weight.shape[0], -1)
        scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        codes = torch.round(flat / scale[:, None]).to(torch.int8).reshape(weight.shape)
        return cls(codes, scale.reshape(-1, *([1] * (weight.ndim - 1))), weight.dtype)

    def dequantize(self) -> torch.Tensor:
        return (self.codes.float() * self.scale).to(self.dtype)

    def __repr__(self):
        return f"QuantizedStandIn(shape={tuple(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _KEPT_QUANTIZED and isinstance(args[0], cls):
            source = args[0]
            device = kwargs.get("device", source.device)
            dtype = kwargs.get("dtype", source.dtype) if func is aten._to_copy.default else source.dtype
            return cls(source.codes.to(device).clone(), source.scale.to(device).clone(), dtype)

        def plain(value):
            return value.dequantize() if isinstance(value, cls) else value

        out = func(*[plain(a) for a in args], **{k: plain(v) for k, v in kwargs.items()})
        if func._schema.name.endswith("_") and args and isinstance(args[0], cls):
            return args[0]  # an in-place op wrote into the temporary, not into the weight
        return out


def quantize_layers(model_patcher, paths) -> None:
    """Replace these layers' weights by quantized stand-ins, in place."""
    for path in paths:
        module = model_patcher.model.get_submodule(path)
        module.weight = torch.nn.Parameter(QuantizedStandIn.quantize(module.weight), requires_grad=False)


def dequantize_layers(model_patcher, paths) -> None:
    """Give these layers exactly the values their quantized stand-ins stand for (the plain-weight twin)."""
    for path in paths:
        module = model_patcher.model.get_submodule(path)
        module.weight = torch.nn.Parameter(QuantizedStandIn.quantize(module.weight).dequantize(), requires_grad=False)
