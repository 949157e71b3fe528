"""Every numeric input of every P-LoRA node checked before the node does any work.

ComfyUI's /prompt accepts the JSON literals NaN and Infinity, and NaN passes its min/max checks
(every comparison with NaN is false); values that arrive through a link are not range-checked at
all. So each node's FUNCTION is wrapped once, at registration, with a check driven by the node's own
INPUT_TYPES: every INT and FLOAT input must be a real number, finite, inside its min/max (and whole
for INT). The message names the node and the input. Nothing else about the call changes: the same
arguments, positional or keyword, reach the original method.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers

NUMERIC_TYPES = ("INT", "FLOAT")
_WRAPPED = "__plora_input_checks__"


def numeric_specs(node_class) -> dict[str, tuple[str, float | None, float | None]]:
    """{input name: (INT or FLOAT, min, max)} from the node's INPUT_TYPES (required and optional)."""
    specs = {}
    declared = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in (declared.get(section) or {}).items():
            if isinstance(spec, (tuple, list)) and spec and spec[0] in NUMERIC_TYPES:
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                specs[name] = (spec[0], options.get("min"), options.get("max"))
    return specs


def _text(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _range(low, high) -> str:
    if low is not None and high is not None:
        return f"from {low} to {high}"
    if low is not None:
        return f"of at least {low}"
    return f"of at most {high}" if high is not None else "(any value)"


def check_value(node: str, name: str, kind: str, low, high, value) -> None:
    """Raise ValueError naming the node and the input unless `value` is a finite number in [low, high]."""
    what = "a whole number" if kind == "INT" else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{node}: input '{name}' must be {what} {_range(low, high)}, not "
                         f"{type(value).__name__} {_text(value)[:80]}.")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{node}: input '{name}' is {number}; it must be a finite number {_range(low, high)}.")
    if kind == "INT" and not number.is_integer():
        raise ValueError(f"{node}: input '{name}' is {value}; it must be {what} {_range(low, high)}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{node}: input '{name}' is {value}, outside its range ({_range(low, high)}).")


def check_inputs(node: str, specs: dict, arguments: dict) -> None:
    """Check every numeric input present in `arguments` (optional inputs left out are not checked)."""
    for name, (kind, low, high) in specs.items():
        if name in arguments and arguments[name] is not None:
            check_value(node, name, kind, low, high, arguments[name])


def named_arguments(signature: inspect.Signature, bound: inspect.BoundArguments) -> dict:
    """{input name: value}, with the inputs a `**widgets` parameter collected taken out of it."""
    arguments = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def add_input_checks(node_class, node_name: str | None = None) -> None:
    """Wrap node_class's FUNCTION (in place, once) so its numeric inputs are checked before it runs."""
    attribute = node_class.FUNCTION
    function = inspect.getattr_static(node_class, attribute)
    if getattr(function, _WRAPPED, False) or not inspect.isfunction(function):
        return  # already wrapped, or a static/class method: not the V1 form this pack uses
    node = node_name or node_class.__name__
    signature = inspect.signature(function)

    @functools.cache
    def specs():
        return numeric_specs(node_class)

    def check(args, kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return  # the original call raises its own TypeError
        check_inputs(node, specs(), named_arguments(signature, bound))

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
