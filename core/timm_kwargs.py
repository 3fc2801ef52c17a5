"""``timm_kwargs`` from JSON, checked against the annotations of the timm class they configure.

Why: timm does not check its keyword types. ``{"class_token": "no"}`` is a non-empty string, so it is
truthy and the model gets the class token it was asked not to have; ``{"mlp_ratio": "4"}`` fails deep in
a layer with an arithmetic error. A job's kwargs arrive as JSON from people who may not know Python's
truthiness, so each kwarg whose constructor parameter is annotated with a JSON-expressible type (bool,
int, float, str, Literal, Optional/Union, tuples and lists of those) is checked before anything is built
from it. Parameters annotated with types JSON cannot express (callables, module classes) are left to
timm, which resolves strings such as ``"gelu"`` itself.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from typing import Any

from torch import nn

from core.errors import ModelSpecError

JSON_NUMBER = (int, float)
_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list) or annotation in (tuple, list):
        inner = [a for a in args if a is not Ellipsis]
        return "a list" + (f" of {_PLURALS.get(inner[0], 'values')}" if len(set(inner)) == 1 else "")
    if isinstance(annotation, type):
        return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
            annotation, annotation.__name__
        )
    return str(annotation)


def matches(value: Any, annotation: Any) -> bool | None:
    """Whether a JSON value fits ``annotation``: True or False, or None where JSON cannot express the
    type (a callable, a module class), so the check has nothing to say."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    if annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        verdicts = [matches(value, a) for a in args]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if origin in (tuple, list) or annotation in (tuple, list):
        if not isinstance(value, list | tuple):
            return False
        # Element types only, not the length: timm annotates some per-stage lists as pairs
        # (Swin's window_size is Tuple[int, int] but takes one value per stage).
        element = next((a for a in args if a is not Ellipsis), Any)
        return not any(matches(v, element) is False for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, JSON_NUMBER) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return None


def check_kwarg_types(model_class: type[nn.Module], kwargs: dict[str, Any]) -> None:
    """Raise :class:`ModelSpecError` naming the first kwarg whose value does not fit its annotation."""
    try:
        parameters = inspect.signature(model_class.__init__).parameters
    except (TypeError, ValueError):  # a constructor without a signature: nothing to check against
        return
    for name, value in kwargs.items():
        parameter = parameters.get(name)
        if parameter is None:
            continue
        annotation = parameter.annotation
        if isinstance(annotation, str):  # a postponed annotation: resolve it in the class's module
            try:
                annotation = typing.get_type_hints(model_class.__init__).get(name, inspect.Parameter.empty)
            except Exception:  # an unresolvable forward reference: say nothing rather than guess
                continue
        if matches(value, annotation) is False:
            raise ModelSpecError(
                f"timm_kwargs.{name} must be {_describe(annotation)} for {model_class.__name__}, not {value!r}"
            )


# -- bounds checked before anything is built or allocated from the kwargs ------------------------------

MAX_JSON_DEPTH = 8
"""Deepest nesting a ``timm_kwargs`` value may have (Swin's per-stage lists need 2). Checked first and
without recursion, so a value nested hundreds of levels deep is a 422, never a RecursionError in the
request hashing or in timm."""
MAX_JSON_ITEMS = 2000
"""Most values (keys, list elements, scalars) one ``timm_kwargs`` object may hold."""
MAX_STRING_CHARS = 200

SIZE_BOUNDS: dict[str, tuple[int, int]] = {
    "in_chans": (1, 1024),
    "num_classes": (1, 100_000),
    "img_size": (1, 4096),
    "patch_size": (1, 1024),
    "embed_dim": (1, 65_536),
    "num_heads": (1, 1024),
    "window_size": (1, 1024),
    "reg_tokens": (0, 1024),
}
"""Every integer size a request can name, with its range. ``in_chans`` of tens of millions allocated
hundreds of MB (the per-channel mean and std) in the API before the parameter count refused it; a
bound checked before the spec is built costs nothing. ``num_classes`` must be at least 1: a headless
model (0) has no top-1 to report. ``depth``/``depths`` are bounded by ``core.models.MAX_BLOCKS``."""
PAIR_SIZES = ("img_size", "patch_size", "window_size")
"""Sizes timm also takes as ``[height, width]``."""
LIST_SIZES = ("num_heads", "window_size")
"""Sizes timm also takes as one value per stage (Swin)."""
RATIO_BOUNDS: dict[str, tuple[float, float]] = {
    "mlp_ratio": (0.0, 64.0),
    "drop_rate": (0.0, 1.0),
    "pos_drop_rate": (0.0, 1.0),
    "patch_drop_rate": (0.0, 1.0),
    "proj_drop_rate": (0.0, 1.0),
    "attn_drop_rate": (0.0, 1.0),
    "drop_path_rate": (0.0, 1.0),
}
"""Numbers a request can name that scale a size (``mlp_ratio``: the hidden width) or are a probability;
``mlp_ratio`` must be above 0, the rates within [0, 1)."""
MAX_STAGES = 16


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_json_shape(value: Any, field: str = "timm_kwargs") -> None:
    """Raise :class:`ModelSpecError` for a JSON value nested deeper than ``MAX_JSON_DEPTH``, holding more
    than ``MAX_JSON_ITEMS`` values, a string longer than ``MAX_STRING_CHARS`` or a number that is not
    finite (``1e400`` parses as infinity). Iterative: its cost is bounded by the limits, whatever the
    input's depth."""
    stack: list[tuple[Any, str, int]] = [(value, field, 0)]
    seen = 0
    while stack:
        item, where, depth = stack.pop()
        seen += 1
        if seen > MAX_JSON_ITEMS:
            raise ModelSpecError(f"{field} holds more than {MAX_JSON_ITEMS} values")
        if isinstance(item, dict | list | tuple):
            if depth >= MAX_JSON_DEPTH:
                raise ModelSpecError(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep")
            if isinstance(item, dict):
                for key, inner in item.items():
                    if not isinstance(key, str) or len(key) > MAX_STRING_CHARS:
                        raise ModelSpecError(f"{where} has a key that is not a string of at most "
                                             f"{MAX_STRING_CHARS} characters")
                    stack.append((inner, f"{where}.{key}", depth + 1))
            else:
                stack.extend((inner, f"{where}[{i}]", depth + 1) for i, inner in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            raise ModelSpecError(f"{where} must be a finite number, not {item!r}")
        elif isinstance(item, str) and len(item) > MAX_STRING_CHARS:
            raise ModelSpecError(f"{where} is a string of {len(item)} characters; at most {MAX_STRING_CHARS}")
        elif item is not None and not isinstance(item, bool | int | float | str | dict | list | tuple):
            raise ModelSpecError(f"{where} is not a JSON value")


def _check_size(name: str, value: Any) -> None:
    low, high = SIZE_BOUNDS[name]
    lists = [form for form, kinds in (("[height, width]", PAIR_SIZES), ("one per stage", LIST_SIZES))
             if name in kinds]
    what = "an integer" + (f" or a list of integers ({' or '.join(lists)})" if lists else "")
    values: list[Any] | None = None
    if _is_int(value):
        values = [value]
    elif isinstance(value, list | tuple) and value:
        if name in LIST_SIZES and len(value) <= MAX_STAGES or name in PAIR_SIZES and len(value) == 2:
            values = list(value)
    if values is None or not all(_is_int(v) for v in values):
        raise ModelSpecError(f"timm_kwargs.{name} must be {what}, each from {low} to {high}, not {_shown(value)}")
    out_of_range = next((v for v in values if not low <= v <= high), None)
    if out_of_range is not None:
        raise ModelSpecError(f"timm_kwargs.{name} must be from {low} to {high}, not {out_of_range}")


def _check_ratio(name: str, value: Any) -> None:
    low, high = RATIO_BOUNDS[name]
    rate = name != "mlp_ratio"
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or not (
        (low <= value < high) if rate else (low < value <= high)
    ):
        span = f"in [{low:g}, {high:g})" if rate else f"above {low:g} and at most {high:g}"
        raise ModelSpecError(f"timm_kwargs.{name} must be a number {span}, not {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_kwarg_bounds(kwargs: Any) -> None:
    """The checks every ``timm_kwargs`` passes before a spec is made from it (API submit, upload, CLI):
    a JSON object of bounded shape (:func:`check_json_shape`), each size in ``SIZE_BOUNDS`` an integer
    (or pair / per-stage list where timm takes one) within its range, each ratio in ``RATIO_BOUNDS``
    finite and within its range. Raises :class:`ModelSpecError` naming the kwarg."""
    if not isinstance(kwargs, dict):
        raise ModelSpecError("timm_kwargs must be an object")
    check_json_shape(kwargs)
    for name, value in kwargs.items():
        if name in SIZE_BOUNDS:
            _check_size(name, value)
        elif name in RATIO_BOUNDS:
            _check_ratio(name, value)
