"""How a diffusers denoiser is called, as an export records and replays it: its
parameters by name, the JSON record of its non-tensor arguments, its output structure."""

from __future__ import annotations

import inspect
import json
from typing import Any

from .errors import DenoiserInputError, ExportError

#: the graph output's name in denoiser exports
OUTPUT_NAME = "sample"


def param_names(module) -> list[str]:
    """Names of ``module.forward``'s parameters that can be passed by name, in order."""
    sig = inspect.signature(module.forward)
    return [n for n, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def forward_defaults(module) -> dict:
    sig = inspect.signature(module.forward)
    return {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def by_name(names: list[str], args: tuple, kwargs: dict, what: str) -> dict:
    if len(args) > len(names):
        raise DenoiserInputError(f"{what} takes at most {len(names)} positional arguments, got {len(args)}")
    out = dict(zip(names, args))
    for k, v in kwargs.items():
        if k in out:
            raise DenoiserInputError(f"{what} got argument '{k}' twice (positionally and by name)")
        out[k] = v
    return out


def recorded_json(value: Any, name: str):
    """``value`` as JSON (tuples become lists) or ExportError naming the argument."""
    import torch

    def conv(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if torch.is_tensor(v):
            raise ExportError(f"argument '{name}' of the denoiser holds a tensor inside a {type(value).__name__}; "
                              f"only top-level tensor arguments can become graph inputs")
        raise ExportError(f"argument '{name}' of the denoiser is a {type(v).__name__}, which an export cannot "
                          f"record; only tensors and JSON values (None, numbers, strings, lists, dicts) are "
                          f"supported")

    return conv(value)


def same_static(a, b) -> bool:
    """Equal as recorded JSON; None and {} both mean 'no options'."""
    norm = (lambda v: None if v == {} else v)
    try:
        return norm(json.loads(json.dumps(a))) == norm(json.loads(json.dumps(b)))
    except (TypeError, ValueError):
        return False


def main_output(out):
    """(the output tensor, structure record) of a denoiser's return value."""
    import torch
    if torch.is_tensor(out):
        return out, {"kind": "tensor"}
    if isinstance(out, (tuple, list)):
        if len(out) != 1 or not torch.is_tensor(out[0]):
            raise ExportError(f"the denoiser returned a {type(out).__name__} of {len(out)} items; an export "
                              f"takes one output tensor")
        return out[0], {"kind": type(out).__name__}
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):  # diffusers BaseOutput
        keys = list(out.keys())
        if len(keys) != 1 or not torch.is_tensor(out[keys[0]]):
            raise ExportError(f"the denoiser returned {type(out).__name__} with fields {keys}; an export takes "
                              f"one output tensor")
        cls = type(out)
        return out[keys[0]], {"kind": "output", "class": f"{cls.__module__}:{cls.__qualname__}", "key": keys[0]}
    raise ExportError(f"the denoiser returned a {type(out).__name__}; expected a tensor, a tuple or a "
                      f"diffusers output")


def rebuild_output(record: dict, v):
    kind = record.get("kind")
    if kind == "tuple":
        return (v,)
    if kind == "list":
        return [v]
    if kind == "output":
        import importlib

        mod, _, qual = record["class"].partition(":")
        cls = importlib.import_module(mod)
        for part in qual.split("."):
            cls = getattr(cls, part)
        return cls(**{record["key"]: v})
    return v


def class_path(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def config_json(module) -> dict | None:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return None
    try:
        items = dict(cfg)
    except (TypeError, ValueError):
        return None
    return {k: v for k, v in json.loads(json.dumps(items, default=str)).items() if not k.startswith("_")}

