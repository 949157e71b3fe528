"""grad_{x_t} R(x0_hat(x_t)) through the diffusion model: the 'exact' mode of Eq. 20.

x0_hat is the denoised prediction the sampler actually has when the guidance hook runs:
ComfyUI's own `cfg_function` (so a `sampler_cfg_function` such as RescaleCFG or a CFG++
style function) followed by the post-CFG functions installed before the hook (PAG, ...),
and the pre-CFG functions before it. It is rebuilt with autograd from the sampler's own
model call (a model-call wrapper keeps its graph on guided steps, so the gradient costs one
backward, not another forward), with an x that requires grad wherever x enters those
functions; the gradients of every copy of x add up. When the rebuilt value is not the
sampler's (area or masked conditionings, a stochastic function), the prediction is
recomputed with autograd through the same functions; when that does not match either,
the caller falls back to the fast-mode gradient for the step.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from ..plora_core.recorder import COND, UNCOND
from .trainable_copy import copy_tensors_as_saved

logger = logging.getLogger("plora")


def normal_tensor_copy(weight: torch.Tensor) -> torch.Tensor:
    """Identity weight wrapper: a copy that autograd may save (ComfyUI's weights are inference tensors)."""
    return weight.clone()


def enable_denoiser_backward(model) -> None:
    """Exact mode backprops through the denoiser; make its weights usable by autograd on the clone."""
    diffusion_model = model.model.diffusion_model
    if not any(p.is_inference() for p in diffusion_model.parameters()):
        return
    if not hasattr(model, "add_weight_wrapper"):
        raise ValueError("gradient_mode 'exact' needs ComfyUI 0.3 or newer for this model (its weights were loaded "
                         "under inference mode). Use gradient_mode 'fast', or update ComfyUI.")
    for name, _ in model.model.named_parameters():
        if name.startswith("diffusion_model.") and name.endswith((".weight", ".bias")):
            model.add_weight_wrapper(name, normal_tensor_copy)
    model.force_cast_weights = True


def normal_tensors(value):
    """Inference tensors (ComfyUI builds the model call's inputs under inference mode) copied to
    normal ones, recursively through dicts, lists and tuples; everything else is passed as is."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        return {k: normal_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(normal_tensors(v) for v in value)
    return value


def _call(previous, apply_model, args):
    if previous is not None:
        return previous(apply_model, args)
    return apply_model(args["input"], args["timestep"], **args["c"])


def options_before_hook(model_options: dict) -> dict:
    """model_options whose post-CFG list stops before the guidance hook (the functions the sampler
    ran before it); later ones (a CFG++ sampler's capture function) and the hook itself are left out."""
    post = list(model_options.get("sampler_post_cfg_function", []))
    cut = next((i for i, fn in enumerate(post) if getattr(fn, "is_plora_score_guidance", False)), len(post))
    return {**model_options, "sampler_post_cfg_function": post[:cut]}


def same_prediction(rebuilt: torch.Tensor, actual: torch.Tensor) -> bool:
    """The rebuilt x0_hat is the sampler's (both computed by the same ops on the same values)."""
    if rebuilt.shape != actual.shape:
        return False
    difference = (rebuilt.detach().float() - actual.float()).abs().max()
    return bool(difference <= 1e-4 * actual.float().abs().max() + 1e-6)


def sum_row_blocks(grads, blocks: list[int]) -> torch.Tensor | None:
    """grad w.r.t. x: every row block of every input came from the same x, so their grads add."""
    total = None
    for grad, count in zip(grads, blocks):
        if grad is None:
            continue
        for rows in grad.chunk(count):
            total = rows if total is None else total + rows
    return total


class DenoiserGradient:
    """Keeps the guided steps' model calls differentiable and turns them into grad_x R."""

    def __init__(self, cfg: float, starts_guided_step: Callable[[float], bool]):
        self.cfg = cfg  # cond_scale when the host's post-CFG args lack it (2024 core)
        self.starts_guided_step = starts_guided_step
        self.copy_saved_tensors = False  # set when the host's blocks modify saved tensors in place
        self.reuse_forward = True
        self._busy = False  # rebuilding or recomputing: the wrapper passes model calls through
        self._kept: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []

    def __deepcopy__(self, memo):
        return self

    def _saving(self):
        return copy_tensors_as_saved() if self.copy_saved_tensors else contextlib.nullcontext()

    def model_call_wrapper(self, previous):
        """A model_function_wrapper that runs guided steps' calls with autograd (chains `previous`)."""

        def plora_differentiable_call(apply_model, args):
            if self._busy or not self.reuse_forward or not self.starts_guided_step(float(args["timestep"].max())):
                return _call(previous, apply_model, args)
            with torch.inference_mode(False), torch.enable_grad(), self._saving():
                x_in = args["input"].detach().clone().requires_grad_(True)
                call_args = {**args, "input": x_in, "timestep": normal_tensors(args["timestep"]),
                             "c": normal_tensors(args["c"])}
                out = _call(previous, apply_model, call_args)
            self._kept.append((list(args["cond_or_uncond"]), x_in, out))
            return out.detach()

        return plora_differentiable_call

    def discard(self) -> None:
        """The sampler's call ended unguided: drop anything kept."""
        self._kept = []

    def _denoised_from(self, args, cond_pred, uncond_pred, x):
        """sampling_function's tail: pre-CFG functions, cfg_function, post-CFG functions before the hook."""
        import comfy.samplers

        options = options_before_hook(args["model_options"])
        scale = args.get("cond_scale", self.cfg)
        conds = [args["cond"], args["uncond"]]
        out = [cond_pred, uncond_pred]
        for fn in options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": conds, "conds_out": out, "cond_scale": scale, "timestep": args["sigma"], "input": x,
                      "sigma": args["sigma"], "model": args["model"], "model_options": options})
        return comfy.samplers.cfg_function(args["model"], out[0], out[1], scale, x, args["sigma"],
                                           model_options=options, cond=args["cond"], uncond=args["uncond"])

    def _from_kept(self, args, kept):
        """(x0_hat with graph, [(input, row blocks)]) from the kept calls, or None if they are not one cond/uncond."""
        preds = {COND: [], UNCOND: []}
        for kinds, _, out in kept:
            for kind, rows in zip(kinds, out.chunk(len(kinds))):
                preds.setdefault(kind, []).append(rows)
        if len(preds[COND]) != 1 or len(preds[UNCOND]) > 1 or len(preds) > 2:
            return None
        if preds[UNCOND]:
            uncond = preds[UNCOND][0]
        elif args["uncond"] is None:  # cond_scale 1: ComfyUI skips the uncond and passes zeros
            uncond = args["uncond_denoised"].detach()
        else:
            return None
        x = args["input"].detach().clone().requires_grad_(True)
        x0 = self._denoised_from(args, preds[COND][0], uncond, x)
        return x0, [(x, 1)] + [(x_in, len(kinds)) for kinds, x_in, _ in kept]

    def _recomputed(self, args):
        """(x0_hat with graph, [(input, 1)]): the sampler's model call again, with autograd."""
        import comfy.samplers

        x = args["input"].detach().clone().requires_grad_(True)
        options = args["model_options"]
        conds = [args["cond"], args["uncond"]]
        if "sampler_calc_cond_batch_function" in options:
            out = options["sampler_calc_cond_batch_function"]({"conds": conds, "input": x, "sigma": args["sigma"],
                                                               "model": args["model"], "model_options": options})
        else:
            out = comfy.samplers.calc_cond_batch(args["model"], conds, x, args["sigma"], options)
        return self._denoised_from(args, out[0], out[1], x), [(x, 1)]

    def _gradient_of(self, build, args, score):
        """grad_x R for the x0_hat that `build` rebuilds, or None when it is not the sampler's."""
        with self._saving():
            built = build()
            if built is None:
                return None
            x0, inputs = built
            if not same_prediction(x0, args["denoised"]):
                return None
            residual, terms = score(x0)
            grads = torch.autograd.grad(residual.sum(), [x for x, _ in inputs], allow_unused=True)
        grad = sum_row_blocks(grads, [count for _, count in inputs])
        return (grad if grad is not None else torch.zeros_like(x0)), residual, terms

    def _inplace_error(self, error: RuntimeError) -> bool:
        """True (once) when backward failed because the host's blocks modify saved tensors in place."""
        if "inplace operation" not in str(error) or self.copy_saved_tensors:
            return False
        logger.info("P-LoRA exact guidance: the model modifies tensors in place; copying saved tensors.")
        self.copy_saved_tensors = True
        return True

    def gradient(self, args, score) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
        """(grad_x R, R, terms) of the sampler's x0_hat at this step, or None when it cannot be rebuilt.

        Call under inference_mode(False) and enable_grad.
        """
        kept, self._kept = self._kept, []
        self._busy = True
        try:
            if kept:
                try:
                    result = self._gradient_of(lambda: self._from_kept(args, kept), args, score)
                    if result is not None:
                        return result
                except RuntimeError as error:  # the kept graph cannot be redone: recompute below
                    if not self._inplace_error(error):
                        raise
            try:
                return self._gradient_of(lambda: self._recomputed(args), args, score)
            except RuntimeError as error:
                if not self._inplace_error(error):
                    raise
                return self._gradient_of(lambda: self._recomputed(args), args, score)
        finally:
            self._busy = False
