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
