"""The rival fusion rules beside the KL gate: K-LoRA's Top-K choice and B-LoRA's block routing.

K-LoRA (Ouyang et al., "K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style
LoRAs", CVPR 2025, method section): per layer, S_c and S_s are the sums of the k = r_c * r_s
largest |dW| entries of the subject and style LoRA; the subject's layer is used while
S_c / gamma > S(t) * S_s, where gamma balances the two LoRAs' overall magnitudes and S(t)
grows with denoising time t (presets "s" and "s*", which wraps once). Their code (HVision-NKU/K-LoRA
`klora.py` L43-73, `utils.py` L157-209) counts layer calls with a global counter against
a hard-coded `sum_timesteps`; here t is the run's progress read from the sigma schedule,
which gives their decisions on their schedule and the same fraction of denoising the
same decision on any other. Everything per layer is computed once, when the pair is
loaded (`klora_layer_scores`); a step only compares stored numbers.

B-LoRA (Frenkel et al., "Implicit Style-Content Separation using B-LoRA", ECCV 2024,
method section): in SDXL, the transformer block W_0^4 (`up_blocks.0.attentions.0`, ComfyUI
`output_blocks.0.1`) carries content and W_0^5 (`up_blocks.0.attentions.1`, ComfyUI
`output_blocks.1.1`) carries style; the subject LoRA acts only in the first, the style
LoRA only in the second (their `blora_utils.py` L3-6, `inference.py` L42-62).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from .deltas import LayerDelta
from .recorder import STYLE, SUBJECT

# Elements of dW formed at once (16 MiB in float32): a 3072 x 12288 Flux layer runs in 9 chunks.
CHUNK_ELEMENTS = 1 << 22


# --- K-LoRA, Top-K sums (dW' = |dW|; S_c, S_s = sums of the Top-K entries of dW'_c, dW'_s) ------------

@dataclass(frozen=True)
class AbsStats:
    """|dW| of one LoRA on one layer: the sum of its k largest entries and the sum of all."""

    topk_sum: float  # S_c or S_s of K-LoRA
    abs_sum: float  # sum |dW|, what K-LoRA's gamma compares (utils.py L186-193)
    k: int  # the k used (clamped to the number of entries)
    numel: int


class _TopK:
    """Running exact Top-K of |values| over chunks, plus the running sum of all |values|."""

    def __init__(self, k: int):
        self.k = k
        self.best: torch.Tensor | None = None
        self.total = 0.0
        self.count = 0

    def add(self, chunk: torch.Tensor, owned: bool = False) -> None:
        """Take in a block of dW; `owned`: the block is a temporary that may be overwritten."""
        flat = (chunk.abs_() if owned else chunk.abs()).reshape(-1)
        self.total += float(flat.sum())
        self.count += flat.numel()
        if self.best is not None and self.best.numel() == self.k:
            # only entries above the current k-th largest can enter (one equal to it adds the same sum)
            flat = flat[flat > self.best.min()]
            if flat.numel() == 0:
                return
        candidates = flat if self.best is None else torch.cat([self.best, flat])
        self.best = candidates.topk(min(self.k, candidates.numel()), sorted=False).values

    def stats(self) -> AbsStats:
        top = 0.0 if self.best is None else float(self.best.sum(dtype=torch.float64))
        return AbsStats(top, self.total, min(self.k, self.count), self.count)


def _check_k(k: int) -> int:
    if int(k) < 1:
        raise ValueError(f"K-LoRA needs k >= 1 (k = rank_subject x rank_style), got {k}.")
    return int(k)


def topk_abs_sum(delta_weight: torch.Tensor, k: int) -> float:
    """Sum of the k largest |entries| of a dense dW (conv kernels flattened); k is clamped to its size."""
    running = _TopK(_check_k(k))
    rows = delta_weight.reshape(delta_weight.shape[0], -1)
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        running.add(rows[start:start + step])
    return running.stats().topk_sum


def _flat_factors(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [out, r], D [r, inner]) with dW.reshape(out, -1) = U @ D; a LoCon mid is folded into D.

    With a mid (Tucker) factor, dW[o, i, h, w] = sum_ab up[o, a] mid[a, b, h, w] down[b, i],
    the kernel that conv(conv(conv(x, down), mid), up) applies (and ComfyUI merges).
    """
    u = up.reshape(up.shape[0], -1).to(dtype)
    if mid is None:
        return u, down.reshape(down.shape[0], -1).to(dtype)
    d = torch.einsum("abhw,bi->aihw", mid.to(dtype), down.reshape(down.shape[0], -1).to(dtype))
    return u, d.reshape(d.shape[0], -1)


def low_rank_abs_stats(up: torch.Tensor, down: torch.Tensor, k: int, scale: float = 1.0,
                       mid: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> AbsStats:
    """Exact Top-K and total of |dW| for dW = scale * up @ down (conv: flattened, optional mid).

    dW is formed a block of rows at a time (CHUNK_ELEMENTS entries), never whole.
    Shapes: up [out, r] or [out, r, 1, 1]; down [r, in] or [r, in, kh, kw]; mid [r, r, kh, kw].
    """
    u, d = _flat_factors(up, down, mid, dtype)
    running = _TopK(_check_k(k))
    step = max(1, CHUNK_ELEMENTS // max(1, d.shape[1]))
    for start in range(0, u.shape[0], step):
        running.add((u[start:start + step] @ d).mul_(scale), owned=True)
    return running.stats()


def _row_span(delta: LayerDelta, rows: tuple[int, int] | None) -> tuple[int, int]:
    return (0, delta.geometry.out_channels) if rows is None else (rows[0], rows[0] + rows[1])


def _parts_in(delta: LayerDelta, span: tuple[int, int]):
    """Low-rank parts overlapping output rows [span): (the part's first row in the layer, part)."""
    for part in delta.low_rank:
        first = 0 if part.rows is None else part.rows[0]
        last = first + part.up.shape[0]
        if first < span[1] and last > span[0]:
            yield first, part


def layer_abs_stats(delta: LayerDelta, k: int, rows: tuple[int, int] | None = None,
                    dtype: torch.dtype = torch.float32) -> AbsStats:
    """Exact Top-K and total of |dW| of everything one LoRA adds to one layer (bias diffs aside).

    dW is the sum of the delta's parts, each scaled (alpha / rank * strength) and placed at
    its rows of a fused layer; `rows` = (start, length) restricts it to a row slice (a Flux
    q, k or v inside a fused qkv, the layers K-LoRA's diffusers Flux keeps apart).
    """
    span = _row_span(delta, rows)
    g = delta.geometry
    inner = (g.in_channels // g.groups) * math.prod(g.kernel_size) if g.kind == "conv" else g.in_channels
    parts = [(first, *_flat_factors(p.up, p.down, p.mid, dtype), p.scale) for first, p in _parts_in(delta, span)]
    dense = [p.weight.reshape(g.out_channels, -1) for p in delta.dense]
    device = parts[0][1].device if parts else (dense[0].device if dense else torch.device("cpu"))
    running = _TopK(_check_k(k))
    step = max(1, CHUNK_ELEMENTS // max(1, inner))
    for start in range(span[0], span[1], step):
        stop = min(start + step, span[1])
        block = None  # rows [start, stop) of dW
        for first, u, d, scale in parts:
            lo, hi = max(start, first), min(stop, first + u.shape[0])
            if lo >= hi:
                continue
            piece = (u[lo - first:hi - first] @ d).mul_(scale)
            if block is None and (lo, hi) == (start, stop):
                block = piece
                continue
            if block is None:
                block = torch.zeros(stop - start, inner, dtype=dtype, device=device)
            block[lo - start:hi - start] += piece
        for weight in dense:
            dense_rows = weight[start:stop].to(device=device, dtype=dtype)
            block = dense_rows.clone() if block is None else block.add_(dense_rows)
        if block is None:
            block = torch.zeros(stop - start, inner, dtype=dtype, device=device)
        running.add(block, owned=True)
    return running.stats()


def delta_rank(delta: LayerDelta, rows: tuple[int, int] | None = None, layer: str = "", role: str = "") -> int:
    """The rank K-LoRA's k uses: up's inner size (klora.py L45), summed over parts meeting `rows`."""
    if delta.dense:
        raise ValueError(
            f"Layer {layer}: the {role or 'a'} LoRA is a LoHa/LoKr/DoRA or full weight diff there, which has no "
            "rank, and K-LoRA's k = rank_subject x rank_style needs one. Use a plain (LoCon) LoRA for k-lora, "
            "or another method for this pair.")
    ranks = [part.up.shape[1] for _, part in _parts_in(delta, _row_span(delta, rows))]
    if not ranks:
        raise ValueError(f"Layer {layer}: the {role or 'a'} LoRA adds nothing to these rows; K-LoRA needs both.")
    return sum(ranks)


@dataclass(frozen=True)
class KLoraLayerScores:
    """What K-LoRA keeps of one layer (or row slice) of a pair: S_c, S_s, the |dW| totals, k."""

    subject_topk: float
    style_topk: float
    subject_abs: float
    style_abs: float
    k: int


def klora_layer_scores(subject: LayerDelta, style: LayerDelta, layer: str = "", rows: tuple[int, int] | None = None,
                       k: int | None = None, dtype: torch.dtype = torch.float32) -> KLoraLayerScores:
    """S_c, S_s with k = r_c * r_s (klora.py L45) and sum |dW| of both, for one layer of the pair.

    Call once per layer when the pair is loaded; the result holds four numbers. `k` overrides
    r_c * r_s (needed when a side has no rank, see `delta_rank`).
    """
    if k is None:
        k = delta_rank(subject, rows, layer, "subject") * delta_rank(style, rows, layer, "style")
    c = layer_abs_stats(subject, k, rows, dtype)
    s = layer_abs_stats(style, k, rows, dtype)
    return KLoraLayerScores(c.topk_sum, s.topk_sum, c.abs_sum, s.abs_sum, c.k)


def klora_gamma(scores: Iterable[KLoraLayerScores]) -> float:
    """gamma of K-LoRA (utils.py L157-209): the mean over layers of sum|dW_c| / sum|dW_s|, then the
    mean again over the layers whose ratio is below 3x that mean (inf when none is).

    Layers where the style LoRA's dW is all zero have no ratio and are left out (the reference
    divides by zero there).
    """
    ratios = [s.subject_abs / s.style_abs for s in scores if s.style_abs > 0]
    if not ratios:
        raise ValueError("K-LoRA's gamma needs at least one layer where both LoRAs change the weights.")
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept) if kept else math.inf


# --- K-LoRA, time (the scaling factor S(t) on S_s, growing as denoising proceeds) -----------------------

@dataclass(frozen=True)
class KLoraPreset:
    """S(t) = alpha * t + beta, taken modulo alpha when `wrap` (klora.py L62-64)."""

    alpha: float
    beta: float
    wrap: bool


# inference_sd.py L51-56 and inference_flux.py L106-111 (since 2025-06-09; "s" had beta 0.75 before).
KLORA_PRESETS = {
    "s": KLoraPreset(alpha=1.5, beta=0.5, wrap=False),  # S rises 0.5 -> 2.0
    "s*": KLoraPreset(alpha=1.5, beta=1.5 * 0.85, wrap=True),  # 1.275 -> 1.5 | 0 at t=0.15 -> 1.275
}


def klora_time_scale(t: float, preset: str | KLoraPreset = "s*") -> float:
    """S(t) for time t in [0, 1): 0 = first layer call of the first step."""
    p = KLORA_PRESETS[preset] if isinstance(preset, str) else preset
    scale = p.alpha * t + p.beta
    return scale % p.alpha if p.wrap else scale


def schedule_position(sigma: float, sample_sigmas: torch.Tensor | Sequence[float]) -> float:
    """Where sigma sits in the run's schedule, in steps: i at sample_sigmas[i], fractional in between.

    Between two schedule sigmas (a sampler's intermediate evaluation) the fraction is taken in
    log sigma (linear in sigma on the last interval, which ends at 0). The number of steps of
    the run is len(sample_sigmas) - 1.
    """
    sig = [float(s) for s in (sample_sigmas.tolist() if isinstance(sample_sigmas, torch.Tensor) else sample_sigmas)]
    if len(sig) < 2:
        raise ValueError("The sampler's schedule needs at least two sigmas (one step).")
    tol = 1e-5
    if any(b > a * (1 + tol) + 1e-12 for a, b in zip(sig, sig[1:])):  # not decreasing (restarts): nearest sigma
        return float(min(range(len(sig)), key=lambda i: abs(sig[i] - sigma)))
    if sigma >= sig[0] * (1 - tol):
        return 0.0
    for i in range(len(sig) - 1):
        hi, lo = sig[i], sig[i + 1]
        if abs(sigma - lo) <= tol * max(lo, 1e-12):
            return float(i + 1)
        if lo < sigma < hi:
            if lo > 0:
                return i + (math.log(hi) - math.log(sigma)) / (math.log(hi) - math.log(lo))
            return i + (hi - sigma) / (hi - lo)
    return float(len(sig) - 1)


def klora_time(step_position: float, num_steps: int, layer_fraction: float = 0.0) -> float:
    """K-LoRA's t = time_ratio / sum_timesteps (klora.py L51, L62) from the run's progress.

    Their counter is (L * step + j) mod (L * N) for the j-th (1-based) of L K-LoRA layers in a
    forward pass of an N-step run (SDXL: 560 layers x 50 steps = the hard-coded 28000; Flux:
    190 layers x 28 steps), i.e. t = (step + j / L) / N mod 1. `layer_fraction` = j / L.
    """
    if num_steps < 1:
        raise ValueError(f"A run has at least one step, got {num_steps}.")
    return ((step_position + layer_fraction) / num_steps) % 1.0


class KLoraRule:
    """K-LoRA's choice per layer and time: the subject's LoRA while S_c / gamma > S(t) * S_s (klora.py L66-73).

    `scores` maps a layer (or slice) name to its `KLoraLayerScores`; gamma is computed from all of
    them unless given. With `layer_order` (the K-LoRA layers in the order a forward pass runs them)
    the j-th layer of a step sees t = (step + j / L) / N, as the reference's counter does; without,
    every layer of a step sees t = step / N. Deciding only compares stored numbers: no Top-K runs.
    """

    def __init__(self, scores: Mapping[str, KLoraLayerScores], preset: str = "s*", gamma: float | None = None,
                 layer_order: Sequence[str] | None = None):
        if preset not in KLORA_PRESETS:
            raise ValueError(f"Unknown K-LoRA preset {preset!r}; use one of {sorted(KLORA_PRESETS)}.")
        self.scores = dict(scores)
        self.preset = preset
        self.gamma = klora_gamma(self.scores.values()) if gamma is None else float(gamma)
        self.layer_fraction: dict[str, float] = {}
        if layer_order is not None:
            order = list(dict.fromkeys(layer_order))
            missing = [name for name in self.scores if name not in order]
            if missing:
                raise ValueError(f"K-LoRA layer_order lacks {len(missing)} scored layers, e.g. {missing[0]}.")
            self.layer_fraction = {name: (j + 1) / len(order) for j, name in enumerate(order)}

    def _score(self, layer: str) -> KLoraLayerScores:
        try:
            return self.scores[layer]
        except KeyError:
            raise KeyError(f"K-LoRA has no Top-K scores for layer {layer}; score every layer both LoRAs "
                           "change when the pair is loaded.") from None

    def time(self, layer: str, step_position: float, num_steps: int) -> float:
        return klora_time(step_position, num_steps, self.layer_fraction.get(layer, 0.0))

    def choose_subject(self, layer: str, step_position: float, num_steps: int) -> bool:
        """True: the subject LoRA acts on `layer` at this step; False: the style LoRA."""
        s = self._score(layer)
        scale = klora_time_scale(self.time(layer, step_position, num_steps), self.preset)
        return s.subject_topk / self.gamma > scale * s.style_topk

    def choices(self, step_position: float, num_steps: int) -> dict[str, bool]:
        """{layer: True if the subject acts} for every scored layer at one step."""
        return {name: self.choose_subject(name, step_position, num_steps) for name in self.scores}

    def __repr__(self) -> str:
        return f"KLoraRule({len(self.scores)} layers, preset={self.preset!r}, gamma={self.gamma:.4g})"


# --- B-LoRA ----------------------------------------------------------------------------------------

# SDXL blocks as B-LoRA names them (diffusers) and where ComfyUI's unet_to_diffusers puts them.
B_LORA_CONTENT_BLOCK = "up_blocks.0.attentions.0"  # ComfyUI: diffusion_model.output_blocks.0.1
B_LORA_STYLE_BLOCK = "up_blocks.0.attentions.1"  # ComfyUI: diffusion_model.output_blocks.1.1
_BLOCK_PATTERNS = (  # (regex on a module path or LoRA key, {captured block: role})
    (re.compile(r"(?:^|[._])output_blocks[._](\d+)[._](\d+)(?=[._]|$)"), {("0", "1"): SUBJECT, ("1", "1"): STYLE}),
    (re.compile(r"(?:^|[._])up_blocks[._](\d+)[._]attentions[._](\d+)(?=[._]|$)"),
     {("0", "0"): SUBJECT, ("0", "1"): STYLE}),
)


def b_lora_routing(layer_path_or_key: str, family: str) -> tuple[str, ...]:
    """Which LoRAs may act on a layer under B-LoRA: (SUBJECT,), (STYLE,) or ().

    The subject (content) LoRA acts only inside SDXL's W_0^4 block, the style LoRA only inside
    W_0^5 (B-LoRA); every layer under a block follows it, as their `filter_lora` keeps
    every key of the block. Takes ComfyUI paths (`diffusion_model.output_blocks.0.1.…`),
    diffusers keys (`unet.up_blocks.0.attentions.0.…`) or kohya keys (`lora_unet_output_blocks_0_1_…`).
    """
    if family.strip().lower() != "sdxl":
        raise ValueError(
            f"B-LoRA routing is defined for SDXL only (its content block {B_LORA_CONTENT_BLOCK} and style block "
            f"{B_LORA_STYLE_BLOCK} exist in SDXL's UNet), but the model is {family}. Use an SDXL checkpoint, "
            "or another method (direct, k-lora, the KL gate) for this model.")
    for pattern, roles in _BLOCK_PATTERNS:
        for match in pattern.finditer(layer_path_or_key):
            role = roles.get(match.groups())
            return (role,) if role else ()
    return ()
