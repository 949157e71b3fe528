"""grad_{x_t} R(x0_hat(x_t)) through the diffusion model: the 'exact' mode of Eq. 20.

The sampler's own model call is run with autograd on guided steps (a model-call wrapper keeps
its graph), so the gradient costs one backward, not another forward. When the CFG result
cannot be rebuilt from the kept outputs (area or combined conditionings), the prediction is
recomputed with autograd instead; the result is the same.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from ..plora_core.recorder import COND, UNCOND
from .trainable_copy import copy_tensors_as_saved

logger = logging.getLogger("plora")


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


class DenoiserGradient:
    """Keeps the guided steps' model calls differentiable and turns them into grad_x R."""

    def __init__(self, cfg: float, is_guided_sigma: Callable[[float], bool]):
        self.cfg = cfg
        self.is_guided_sigma = is_guided_sigma
        self.copy_saved_tensors = False  # set when the host's blocks modify saved tensors in place
        self.reuse_forward = True
        self._recomputing = False
        self._kept: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
        self._kept_sigma: float | None = None

    def __deepcopy__(self, memo):
        return self

    def _saving(self):
        return copy_tensors_as_saved() if self.copy_saved_tensors else contextlib.nullcontext()

    def model_call_wrapper(self, previous):
        """A model_function_wrapper that runs guided steps' calls with autograd (chains `previous`)."""

        def plora_differentiable_call(apply_model, args):
            sigma = float(args["timestep"].max())
            if self._recomputing or not self.reuse_forward or not self.is_guided_sigma(sigma):
                return _call(previous, apply_model, args)
            if self._kept_sigma != sigma:
                self._kept, self._kept_sigma = [], sigma
            with torch.inference_mode(False), torch.enable_grad(), self._saving():
                x_in = args["input"].detach().clone().requires_grad_(True)
                call_args = {**args, "input": x_in, "timestep": normal_tensors(args["timestep"]),
                             "c": normal_tensors(args["c"])}
                out = _call(previous, apply_model, call_args)
            self._kept.append((list(args["cond_or_uncond"]), x_in, out))
            return out.detach()

        return plora_differentiable_call

    def _from_kept_call(self, args, sigma: float):
        """(x0_hat with graph, inputs with grad) from the kept calls, or None if they do not rebuild CFG."""
        kept = self._kept if self._kept_sigma == sigma else []
        self._kept, self._kept_sigma = [], None
        preds = {COND: [], UNCOND: []}
        for kinds, _, out in kept:
            for kind, rows in zip(kinds, out.chunk(len(kinds))):
                preds.setdefault(kind, []).append(rows)
        if len(preds[COND]) != 1 or len(preds[UNCOND]) > 1:
            return None
        cond = preds[COND][0]
        if not torch.allclose(cond.detach(), args["cond_denoised"], rtol=1e-4, atol=1e-5):
            return None
        if args["uncond"] is None or not preds[UNCOND]:
            return (cond, [x for _, x, _ in kept]) if args["uncond"] is None else None
        uncond = preds[UNCOND][0]
        if not torch.allclose(uncond.detach(), args["uncond_denoised"], rtol=1e-4, atol=1e-5):
            return None
        return uncond + (cond - uncond) * self.cfg, [x for _, x, _ in kept]

    @staticmethod
    def _sum_rows(grads: list[torch.Tensor], kinds_per_call: list[list[int]]) -> torch.Tensor:
        """grad w.r.t. x: every row block of every call came from the same x, so their grads add."""
        total = None
        for grad, kinds in zip(grads, kinds_per_call):
            for rows in grad.chunk(len(kinds)):
                total = rows if total is None else total + rows
        return total

    def _recomputed(self, args, score):
        import comfy.samplers

        x = args["input"].detach().clone().requires_grad_(True)
        self._recomputing = True  # the model-call wrapper passes this call through untouched
        try:
            with self._saving():
                cond, uncond = comfy.samplers.calc_cond_batch(args["model"], [args["cond"], args["uncond"]], x,
                                                              args["sigma"], args["model_options"])
                x0 = cond if args["uncond"] is None else uncond + (cond - uncond) * self.cfg
                residual, terms = score(x0)
                return torch.autograd.grad(residual.sum(), x)[0], residual, terms
        finally:
            self._recomputing = False

    def gradient(self, args, score) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(grad_x R, R, terms) at this step; call under inference_mode(False) and enable_grad."""
        kinds_per_call = [kinds for kinds, _, _ in self._kept]
        rebuilt = self._from_kept_call(args, float(args["sigma"].max()))
        if rebuilt is not None:
            x0, inputs = rebuilt
            try:
                residual, terms = score(x0)
                grads = torch.autograd.grad(residual.sum(), inputs)
                return self._sum_rows(list(grads), kinds_per_call), residual, terms
            except RuntimeError as error:
                if "inplace operation" not in str(error):
                    raise
                logger.info("P-LoRA exact guidance: the model modifies tensors in place; copying saved tensors.")
                self.copy_saved_tensors = True
        try:
            return self._recomputed(args, score)
        except RuntimeError as error:
            if "inplace operation" not in str(error) or self.copy_saved_tensors:
                raise
            logger.info("P-LoRA exact guidance: the model modifies tensors in place; copying saved tensors.")
            self.copy_saved_tensors = True
            return self._recomputed(args, score)
