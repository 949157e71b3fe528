"""exact mode's grad_x R through the denoiser (paper Eq. 20 as written), for `guidance.py`.

x0_hat is the denoised prediction the sampler actually has when the hook runs: ComfyUI's own
`cfg_function` (so a `sampler_cfg_function` such as RescaleCFG or a CFG++ function) after the
pre-CFG functions, followed by the post-CFG functions installed before the hook (PAG, ...). It is
rebuilt with autograd from the kept model call, with an x that requires grad wherever x enters
those functions; the gradients of every copy of x add up. When the rebuilt value is not the
sampler's (area or masked conditionings), the call is recomputed with autograd through the same
functions; when that does not match either (a stochastic function), the step uses the fast gradient.
"""

from __future__ import annotations

import torch

from ..plora_core.recorder import COND, UNCOND
from . import host


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


def call_model(previous, apply_model, args):
    if previous is not None:
        return previous(apply_model, args)
    return apply_model(args["input"], args["timestep"], **args["c"])


def options_before(model_options: dict, hook) -> dict:
    """model_options whose post-CFG list stops before `hook` (the functions the sampler ran before it);
    later ones (a CFG++ sampler's capture function) and the hook itself are left out."""
    post = list(model_options.get("sampler_post_cfg_function", []))
    cut = next((i for i, fn in enumerate(post) if fn == hook), len(post))  # ==: the same bound method
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


def denoised_from(args, options: dict, cfg: float, cond_pred, uncond_pred, x):
    """sampling_function's tail: pre-CFG functions, cfg_function, post-CFG functions in `options`."""
    scale = args.get("cond_scale", cfg)
    conds = [args["cond"], args["uncond"]]
    out = [cond_pred, uncond_pred]
    for fn in options.get("sampler_pre_cfg_function", []):
        out = fn({"conds": conds, "conds_out": out, "cond_scale": scale, "timestep": args["sigma"], "input": x,
                  "sigma": args["sigma"], "model": args["model"], "model_options": options})
    return host.cfg_function(args["model"], out[0], out[1], scale, x, args["sigma"], options, args["cond"],
                             args["uncond"])


def from_kept(args, options, cfg, kept):
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
    x0 = denoised_from(args, options, cfg, preds[COND][0], uncond, x)
    return x0, [(x, 1)] + [(x_in, len(kinds)) for kinds, x_in, _ in kept]


def recomputed(args, options, cfg):
    """(x0_hat with graph, [(input, 1)]): the sampler's model call again, with autograd."""
    x = args["input"].detach().clone().requires_grad_(True)
    model_options = args["model_options"]
    conds = [args["cond"], args["uncond"]]
    if "sampler_calc_cond_batch_function" in model_options:
        out = model_options["sampler_calc_cond_batch_function"]({"conds": conds, "input": x, "sigma": args["sigma"],
                                                                 "model": args["model"],
                                                                 "model_options": model_options})
    else:
        out = host.calc_cond_batch(args["model"], conds, x, args["sigma"], model_options)
    return denoised_from(args, options, cfg, out[0], out[1], x), [(x, 1)]


def exact_gradient(state, args, options, cfg, kept, score_of):
    """(grad_x R, R, terms) of the sampler's x0_hat at this step, or None when it cannot be rebuilt.

    `state` is the guidance's HookState (`saving()`, `learn_inplace(error)`).

    Call under inference_mode(False) and enable_grad.
    """
    def gradient_of(build):
        with state.saving():
            built = build()
            if built is None:
                return None
            x0, inputs = built
            if not same_prediction(x0, args["denoised"]):
                return None
            residual, terms = score_of(x0)
            grads = torch.autograd.grad(residual.sum(), [x for x, _ in inputs], allow_unused=True)
        grad = sum_row_blocks(grads, [count for _, count in inputs])
        return (grad if grad is not None else torch.zeros_like(x0)), residual, terms

    if kept:
        try:
            result = gradient_of(lambda: from_kept(args, options, cfg, kept))
            if result is not None:
                return result
        except RuntimeError as error:  # the kept graph cannot be redone: recompute below
            if not state.learn_inplace(error):
                raise
    try:
        return gradient_of(lambda: recomputed(args, options, cfg))
    except RuntimeError as error:
        if not state.learn_inplace(error):
            raise
        return gradient_of(lambda: recomputed(args, options, cfg))
