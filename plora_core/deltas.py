"""A LoRA's contribution to one layer, applied to the layer's input: dW(x).

The gate needs F_hat = F + s * dW(x) (Eq. 9-10) for two LoRAs at once, so a
low-rank delta is applied as up(down(x)) without ever materialising W0 + dW.
Adapters with no factored form (LoHa, LoKr, DoRA, full diffs) arrive as a dense
dW that the host computed once, and are applied as one dense matmul/conv.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LayerGeometry:
    """What the delta must match: the target layer's kind and shape."""

    kind: str  # "linear" or "conv"
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def channel_dim(self) -> int:
        """Where the channels of this layer's output live: last dim or dim 1."""
        return -1 if self.kind == "linear" else 1

    @classmethod
    def of_module(cls, module: torch.nn.Module) -> "LayerGeometry":
        """Read the geometry off a torch Linear or ConvNd (ComfyUI's ops subclass them)."""
        if isinstance(module, torch.nn.Linear):
            return cls("linear", module.out_features, module.in_features)
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            return cls(
                "conv", module.out_channels, module.in_channels, tuple(module.kernel_size),
                tuple(module.stride), module.padding if isinstance(module.padding, str) else tuple(module.padding),
                tuple(module.dilation), module.groups,
            )
        raise TypeError(f"P-LoRA can gate Linear and Conv layers, not {type(module).__name__}.")

    def conv_fn(self):
        return (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel_size) - 1]


@dataclass
class LowRankPart:
    """up @ down (with an optional LoCon/Tucker mid), scaled; rows [start, start+length)."""

    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    scale: float  # alpha / rank * strength
    mid: torch.Tensor | None = None  # [r, r, kh, kw]
    rows: tuple[int, int] | None = None  # (start, length) inside a fused layer (Flux qkv)


@dataclass
class DensePart:
    """A dense dW (already scaled) for adapters without a factored form."""

    weight: torch.Tensor  # same shape as the layer's weight


@dataclass
class LayerDelta:
    """Everything one LoRA adds to one layer: low-rank parts, dense parts, a bias diff."""

    geometry: LayerGeometry
    low_rank: list[LowRankPart] = field(default_factory=list)
    dense: list[DensePart] = field(default_factory=list)
    bias: torch.Tensor | None = None  # already scaled
    _cache: dict = field(default_factory=dict, repr=False)

    def is_empty(self) -> bool:
        return not (self.low_rank or self.dense or self.bias is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """dW(x) for this layer's input x (the same x the layer received)."""
        low_rank, dense, bias = self._on(x.device, x.dtype)
        g = self.geometry
        out = None
        if dense is not None or bias is not None:
            out = self._apply_dense(x, dense, bias)
        for part in low_rank:
            piece = self._apply_low_rank(x, part)
            if part.rows is None:
                out = piece if out is None else out + piece
            else:
                if out is None:
                    shape = list(piece.shape)
                    shape[g.channel_dim] = g.out_channels
                    out = piece.new_zeros(shape)
                start, length = part.rows
                out.narrow(g.channel_dim, start, length).add_(piece)
        return out

    def _apply_low_rank(self, x: torch.Tensor, part: LowRankPart) -> torch.Tensor:
        g = self.geometry
        # `part` comes from _on(), where the scale is already folded into `up`
        if g.kind == "linear":
            return F.linear(F.linear(x, part.down), part.up)
        conv = g.conv_fn()
        if part.mid is None:
            hidden = conv(x, part.down, None, g.stride, g.padding, g.dilation)
        else:
            hidden = conv(conv(x, part.down), part.mid, None, g.stride, g.padding, g.dilation)
        return conv(hidden, part.up)

    def _apply_dense(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        g = self.geometry
        if weight is None:  # a bias diff alone: needs the output's shape, which only a zero-weight pass gives
            shape = [g.out_channels, g.in_channels // g.groups, *g.kernel_size]
            weight = x.new_zeros(shape if g.kind == "conv" else shape[:2])
        if g.kind == "linear":
            return F.linear(x, weight, bias)
        return g.conv_fn()(x, weight, bias, g.stride, g.padding, g.dilation, g.groups)

    def _on(self, device: torch.device, dtype: torch.dtype):
        """The parts cast to the input's device and dtype, cached (factors are tiny).

        Scales are folded into `up` and dense parts summed into one weight here, once, so a
        call does no per-part arithmetic on the layer output. Tensors made under inference mode
        (ComfyUI runs every node in it) cannot be saved for backward, so calls made outside it
        (exact score guidance differentiates through the gate) get their own normal-tensor copies.
        """
        inference = torch.is_inference_mode_enabled()
        key = (device, dtype, inference)
        if key not in self._cache:
            def cast(t):
                if t is None:
                    return None
                cast_tensor = t.to(device=device, dtype=dtype)
                return cast_tensor.clone() if cast_tensor.is_inference() and not inference else cast_tensor
            # the scale is folded into `up` once, saving a pass over the layer output per call
            low_rank = [LowRankPart(cast(p.up * p.scale), cast(p.down), 1.0, cast(p.mid), p.rows)
                        for p in self.low_rank]
            dense = cast(torch.stack([p.weight for p in self.dense]).sum(0)) if self.dense else None
            self._cache[key] = (low_rank, dense, cast(self.bias))
        return self._cache[key]


class LayerMismatch(ValueError):
    """A LoRA's tensors do not fit a model layer. Carries the layer and the LoRA (its name), so callers
    can tell which file failed without reading the message."""

    def __init__(self, message: str, layer: str, lora: str | None = None):
        super().__init__(message)
        self.layer = layer
        self.lora = lora


def normalise_factors(geometry: LayerGeometry, up: torch.Tensor, down: torch.Tensor,
                      mid: torch.Tensor | None, rows_length: int | None, layer: str,
                      lora: str | None = None) -> tuple:
    """Bring LoRA factors to the layer's form and check their shapes (names the layer on error).

    Linear layers take 2-D factors; conv layers take 4-D (a 2-D factor from a peft file
    for a 1x1 conv is reshaped). Returns (up, down, mid).
    """
    out_expected = rows_length if rows_length is not None else geometry.out_channels
    rank = down.shape[0]
    if geometry.kind == "linear":
        up, down = up.reshape(up.shape[0], -1), down.reshape(rank, -1)
        if mid is not None:
            raise LayerMismatch(f"Layer {layer}: a LoCon 'mid' factor was given for a Linear layer.", layer, lora)
        ok = up.shape == (out_expected, rank) and down.shape[1] == geometry.in_channels
    else:
        spatial = len(geometry.kernel_size)
        ones = (1,) * spatial
        up = up.reshape(up.shape[0], up.shape[1], *ones)
        if mid is None:
            full_shape = (rank, geometry.in_channels, *geometry.kernel_size)
            if down.ndim == 2 and down.numel() == torch.Size(full_shape).numel():
                down = down.reshape(full_shape)
            ok = (up.shape[0] == out_expected and up.shape[1] == rank
                  and tuple(down.shape) == full_shape)
        else:
            down = down.reshape(rank, -1, *ones)
            ok = (up.shape[0] == out_expected and tuple(mid.shape[2:]) == geometry.kernel_size
                  and down.shape[1] == geometry.in_channels)
        ok = ok and geometry.groups == 1
    if not ok:
        got = f"up {tuple(up.shape)}, down {tuple(down.shape)}"
        got += f", mid {tuple(mid.shape)}" if mid is not None else ""
        raise LayerMismatch(
            f"Layer {layer}: LoRA factors ({got}) do not fit the model's layer "
            f"({geometry.kind}, {geometry.in_channels} -> {out_expected} channels"
            f"{', kernel ' + str(geometry.kernel_size) if geometry.kind == 'conv' else ''}). "
            "The LoRA was probably trained for another base model; pick one made for this checkpoint.", layer, lora)
    return up, down, mid


class DeltaStack:
    """Several LoRAs' deltas on one layer from one input: dW_1(x), ..., dW_N(x) (Eq. 9-10 for each).

    Where every delta is one plain low-rank Linear part (the usual LoRA: `plain`), they are
    computed as one [N, ..., out] tensor from two GEMMs: x @ [A_1; ...; A_N]^T for all
    down-projections at once, then a batched up-projection (ranks padded with zero rows to the
    largest: the padding adds exact zeros). The stacked factors are cast and laid out once per
    device and dtype. `kernel_factors` gives the fused gate the stacked down- and up-projections
    instead (`factors_for_kernels` the down-projection's output and the up-projections), so the
    deltas are formed inside its kernels and never written.
    Otherwise each delta is applied on its own; `stacked=True` then stacks them (one copy).
    """

    def __init__(self, deltas):
        self.deltas = tuple(deltas)
        self._cache: dict = {}
        self.plain = all(d.geometry.kind == "linear" and len(d.low_rank) == 1 and not d.dense and d.bias is None
                         and d.low_rank[0].rows is None and d.low_rank[0].mid is None for d in self.deltas)

    def __len__(self) -> int:
        return len(self.deltas)

    def __call__(self, x: torch.Tensor, stacked: bool = False):
        """[N, ..., out] tensor (always where the deltas are plain low-rank), else a tuple of N tensors."""
        if not self.plain:
            outs = tuple(d(x) for d in self.deltas)
            return torch.stack(outs) if stacked else outs
        down, up_t = self._factors(x.device, x.dtype, 0)
        count, rank = up_t.shape[0], up_t.shape[1]
        hidden = F.linear(x, down).reshape(-1, count, rank).transpose(0, 1)  # [N, rows, r]
        out = torch.bmm(hidden, up_t)  # [N, rows, out]
        return out.view(count, *x.shape[:-1], up_t.shape[2])

    def added_to(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """F + dW_1(x) + ... + dW_N(x): every LoRA acting, as a direct merge (outside the gate's window)."""
        out = base
        for delta in self(x):
            out = out + delta
        return out

    def factors_for_kernels(self, x: torch.Tensor, min_rank: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(x @ [A_1; ...; A_N]^T as [..., N * R], up^T [N, R, out]) for plain deltas, R the largest rank padded
        with zeros to a power of two >= `min_rank` (what the fused kernels' matrix products take)."""
        down, up_t = self._factors(x.device, x.dtype, min_rank)
        return F.linear(x, down), up_t

    def kernel_factors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(down [N * R, in], up^T [N, R, out]) for plain deltas, contiguous in `dtype` on `device`, R the largest
        rank padded with zeros (rows of down, rows of up^T) to a power of two >= 16; cached. What
        `fused_gate.gate_from_input` takes: the whole delta, the down projection included, in its kernels."""
        return self._factors(device, dtype, 16)

    def _factors(self, device: torch.device, dtype: torch.dtype, min_rank: int):
        """(down [N R, in], up^T [N, R, out]) on the input's device and dtype, scales folded in; cached.

        R is the largest rank, or with `min_rank` that padded to a power of two at least `min_rank`."""
        inference = torch.is_inference_mode_enabled()
        key = (device, dtype, inference, min_rank)
        if key not in self._cache:
            parts = [d.low_rank[0] for d in self.deltas]
            rank = max(p.down.shape[0] for p in parts)
            if min_rank:
                rank = max(min_rank, 1 << (rank - 1).bit_length())
            down = torch.zeros(len(parts) * rank, parts[0].down.shape[1], dtype=torch.float32)
            up_t = torch.zeros(len(parts), rank, parts[0].up.shape[0], dtype=torch.float32)
            for k, p in enumerate(parts):
                r = p.down.shape[0]
                down[k * rank:k * rank + r] = p.down.float().cpu()
                up_t[k, :r] = (p.up * p.scale).float().cpu().t()  # as LayerDelta._on rounds it
            # built outside inference mode when called outside it (exact guidance saves them for backward)
            self._cache[key] = (down.to(device=device, dtype=dtype), up_t.to(device=device, dtype=dtype))
        return self._cache[key]
