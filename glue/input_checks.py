"""Every input of every P-LoRA node checked before the node does any work, by one mechanism.

ComfyUI checks widget values against the widget (and even there NaN passes min/max: every comparison
with NaN is false), but a value that arrives through a link from another node is not checked at all:
an "any type" output can feed a list into a COMBO, a float into an INT, a 3-dim tensor or an empty
batch into an IMAGE. So each node's FUNCTION is wrapped once, at registration, with checks driven by
the node's own INPUT_TYPES:

- IMAGE: a 4-dim float tensor [B, H, W, C], B, H, W >= 1, C in 1, 3, 4, every value finite;
- LATENT: a dict whose `samples` is a 4- or 5-dim tensor with no empty dimension;
- STRING: a str; COMBO: a str among the choices (file lists named in the node's FILE_INPUTS only a
  str: the loader finds the file and answers ComfyUI's own "not found" message);
- INT: an int (not a float or bool) inside min/max; FLOAT: a finite real number inside min/max;
- the pack's own types (PLORA_PAIR, PLORA_ENCODER), registered with `register_object_type`.

The message starts "<Node>: input '<name>' " and says what to connect instead. Nothing else about
the call changes: the same arguments, positional or keyword, reach the original method.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from dataclasses import dataclass, field

import torch

from ..plora_core.files import shown_name

NUMERIC_TYPES = ("INT", "FLOAT")
COMBO = "COMBO"
IMAGE_CHANNELS = (1, 3, 4)
_WRAPPED = "__plora_input_checks__"
_OBJECT_TYPES: dict[str, tuple[type, str]] = {}  # type name -> (class, what to connect)


@dataclass(frozen=True)
class InputSpec:
    """One declared input: its type name (COMBO for a list of choices) and what is checked about it."""

    kind: str
    required: bool = True
    low: float | None = None
    high: float | None = None
    choices: tuple = field(default=(), compare=False)
    names_a_file: bool = False


def register_object_type(type_name: str, cls: type, connect: str) -> None:
    """Inputs of `type_name` must be `cls` instances; `connect` names the node whose output fits."""
    _OBJECT_TYPES[type_name] = (cls, connect)


def input_specs(node_class) -> dict[str, InputSpec]:
    """{input name: InputSpec} from the node's INPUT_TYPES (required and optional), for the checked types."""
    specs = {}
    declared = node_class.INPUT_TYPES()
    files = set(getattr(node_class, "FILE_INPUTS", ()))
    for section in ("required", "optional"):
        for name, spec in (declared.get(section) or {}).items():
            if not isinstance(spec, (tuple, list)) or not spec:
                continue
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            kind, required = spec[0], section == "required"
            if isinstance(kind, (list, tuple)):
                specs[name] = InputSpec(COMBO, required, choices=tuple(kind), names_a_file=name in files)
            elif kind in NUMERIC_TYPES:
                specs[name] = InputSpec(kind, required, options.get("min"), options.get("max"))
            elif kind in ("IMAGE", "LATENT", "STRING") or kind in _OBJECT_TYPES:
                specs[name] = InputSpec(kind, required)
    return specs


def numeric_specs(node_class) -> dict[str, tuple[str, float | None, float | None]]:
    """{input name: (INT or FLOAT, min, max)}: the numeric part of `input_specs`."""
    return {name: (spec.kind, spec.low, spec.high) for name, spec in input_specs(node_class).items()
            if spec.kind in NUMERIC_TYPES}


def _text(value) -> str:
    return repr(shown_name(value)[:80]) if isinstance(value, str) else shown_name(repr(value))[:80]


def _got(value) -> str:
    """What arrived, briefly: 'a list [1, 2]', 'a Tensor of shape (2, 3)'."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {_text(value)}"


def _range(low, high) -> str:
    if low is not None and high is not None:
        return f"from {low} to {high}"
    if low is not None:
        return f"of at least {low}"
    return f"of at most {high}" if high is not None else "(any value)"


def check_value(node: str, name: str, kind: str, low, high, value) -> None:
    """Raise ValueError naming the node and the input unless `value` is a finite number in [low, high]
    (an int, not a float, for INT)."""
    what = "a whole number" if kind == "INT" else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{node}: input '{name}' must be {what} {_range(low, high)}, not "
                         f"{type(value).__name__} {_text(value)}; connect a widget or an {kind} output.")
    if kind == "INT" and not isinstance(value, numbers.Integral):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{node}: input '{name}' is {number}; it must be a finite number {_range(low, high)}.")
        raise ValueError(f"{node}: input '{name}' is {value}; it must be {what} {_range(low, high)} (an INT, "
                         "not a FLOAT: round it first, e.g. with a float-to-int node).")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{node}: input '{name}' is {number}; it must be a finite number {_range(low, high)}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{node}: input '{name}' is {value}, outside its range ({_range(low, high)}).")


def check_image(node: str, name: str, value) -> None:
    """A ComfyUI IMAGE: float [B, H, W, C], B, H, W >= 1, C in 1, 3, 4, finite."""
    where = f"{node}: input '{name}'"
    connect = "connect an IMAGE output (Load Image, VAE Decode, Batch Images)"
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"{where} must be an IMAGE (a float [batch, height, width, channels] tensor), not "
                         f"{_got(value)}; {connect}.")
    if value.ndim != 4:
        raise ValueError(f"{where} has shape {tuple(value.shape)} ({value.ndim} dimensions); an IMAGE is "
                         f"[batch, height, width, channels]: {connect}.")
    batch, height, width, channels = value.shape
    if batch < 1:
        raise ValueError(f"{where} is an empty batch (shape {tuple(value.shape)}); {connect} holding at least "
                         "one image.")
    if height < 1 or width < 1:
        raise ValueError(f"{where} has images of size {height} x {width} pixels (shape {tuple(value.shape)}); "
                         f"{connect} with images of at least 1 x 1 pixel.")
    if channels not in IMAGE_CHANNELS:
        raise ValueError(f"{where} has {channels} channels (shape {tuple(value.shape)}); an IMAGE has 1, 3 or 4 "
                         f"channels last (a MASK or a LATENT is not an IMAGE): {connect}.")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{where} holds NaN or infinite pixel values; check the node that made it (e.g. a VAE "
                         "in fp16 that overflowed: run it in fp32) and connect an image of finite values.")


def check_latent(node: str, name: str, value) -> None:
    """A ComfyUI LATENT: {"samples": [B, C, H, W] or [B, C, T, H, W] tensor, ...}, no empty dimension."""
    where = f"{node}: input '{name}'"
    connect = "connect a LATENT output (Empty Latent Image, VAE Encode, a sampler)"
    samples = value.get("samples") if isinstance(value, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"{where} must be a LATENT (a dict holding a 'samples' tensor), not {_got(value)}; "
                         f"{connect}.")
    if samples.ndim not in (4, 5) or min(samples.shape) < 1:
        raise ValueError(f"{where} has samples of shape {tuple(samples.shape)}; a LATENT holds a non-empty "
                         f"[batch, channels, height, width] (or video [batch, channels, frames, height, width]) "
                         f"tensor: {connect}.")


def check_text(node: str, name: str, spec: InputSpec, value, fresh_choices) -> None:
    """STRING: a str. COMBO: a str among the choices (re-read once from INPUT_TYPES: file lists change)."""
    where = f"{node}: input '{name}'"
    if spec.kind == "STRING":
        if not isinstance(value, str):
            raise ValueError(f"{where} must be text (a STRING), not {_got(value)}; connect a text widget or a "
                             "STRING output.")
        return
    if not isinstance(value, str):
        raise ValueError(f"{where} must be one of its list's names, not {_got(value)}; pick it in the widget or "
                         "connect an output of the same list type.")
    if spec.names_a_file or value in spec.choices or value in fresh_choices():
        return
    shown = ", ".join(repr(shown_name(c)) for c in spec.choices[:8]) + (", ..." if len(spec.choices) > 8 else "")
    raise ValueError(f"{where} is {_text(value)}, which is not one of its choices ({shown}); pick one in the "
                     "widget or connect an output of the same list type.")


def check_object(node: str, name: str, kind: str, value) -> None:
    cls, connect = _OBJECT_TYPES[kind]
    if not isinstance(value, cls):
        raise ValueError(f"{node}: input '{name}' must be a {kind}, not {_got(value)}; connect the {kind} "
                         f"output of {connect}.")


def check_argument(node: str, name: str, spec: InputSpec, value, fresh_choices=lambda: ()) -> None:
    """Raise ValueError "<node>: input '<name>' ..." unless `value` is a valid `spec` value."""
    if spec.kind in NUMERIC_TYPES:
        check_value(node, name, spec.kind, spec.low, spec.high, value)
    elif spec.kind == "IMAGE":
        check_image(node, name, value)
    elif spec.kind == "LATENT":
        check_latent(node, name, value)
    elif spec.kind in ("STRING", COMBO):
        check_text(node, name, spec, value, fresh_choices)
    elif spec.kind in _OBJECT_TYPES:
        check_object(node, name, spec.kind, value)


def check_inputs(node: str, specs: dict, arguments: dict, fresh_specs=None) -> None:
    """Check every declared input present in `arguments`, in declared order. Optional inputs left out (or
    None) are not checked; a required input that is None is refused. `specs` values are InputSpec or, for
    numbers, (kind, min, max) tuples."""
    for name, spec in specs.items():
        if isinstance(spec, tuple):  # (INT or FLOAT, min, max), as numeric_specs gives
            spec = InputSpec(spec[0], False, *spec[1:])
        value = arguments.get(name)
        if value is None:
            if spec.required and name in arguments:
                raise ValueError(f"{node}: input '{name}' is empty (None); connect a {spec.kind} value.")
            continue

        def fresh_choices(name=name):
            current = fresh_specs().get(name) if fresh_specs is not None else None
            return current.choices if current is not None else ()

        check_argument(node, name, spec, value, fresh_choices)


def named_arguments(signature: inspect.Signature, bound: inspect.BoundArguments) -> dict:
    """{input name: value}, with the inputs a `**widgets` parameter collected taken out of it."""
    arguments = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def add_input_checks(node_class, node_name: str | None = None) -> None:
    """Wrap node_class's FUNCTION (in place, once) so its inputs are checked before it runs."""
    attribute = node_class.FUNCTION
    function = inspect.getattr_static(node_class, attribute)
    if getattr(function, _WRAPPED, False) or not inspect.isfunction(function):
        return  # already wrapped, or a static/class method: not the V1 form this pack uses
    node = node_name or node_class.__name__
    signature = inspect.signature(function)

    @functools.cache
    def specs():
        return input_specs(node_class)

    def check(args, kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return  # the original call raises its own TypeError
        check_inputs(node, specs(), named_arguments(signature, bound), lambda: input_specs(node_class))

    if inspect.iscoroutinefunction(function):
        @functools.wraps(function)
        async def checked(*args, **kwargs):
            check(args, kwargs)
            return await function(*args, **kwargs)
    else:
        @functools.wraps(function)
        def checked(*args, **kwargs):
            check(args, kwargs)
            return function(*args, **kwargs)

    setattr(checked, _WRAPPED, True)
    setattr(node_class, attribute, checked)
