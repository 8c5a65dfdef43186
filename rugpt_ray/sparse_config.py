"""The ``sparse_attention`` section of a DeepSpeed JSON: its keys, DeepSpeed's defaults and checks.

Torch-free, so configs are checked (and `rugpt-ray --help` runs) without importing torch; `sparsity` builds the
layouts. Defaults are DeepSpeed's ``*SparsityConfig`` constructors' defaults (not its JSON reader's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rugpt_ray.errors import UserError

__all__ = ["MODES", "XL_SPARSE_ATTENTION", "is_int", "normalize_sparse_config"]

#: The ``sparse_attention`` section ruGPT3XL was trained with (DeepSpeed JSON keys).
XL_SPARSE_ATTENTION: dict[str, Any] = {
    "mode": "fixed",
    "block": 16,
    "different_layout_per_head": True,
    "num_local_blocks": 8,
    "num_global_blocks": 1,
    "attention": "unidirectional",
    "horizontal_global_attention": False,
    "num_different_global_patterns": 8,
}

_BASE = {"block": 16, "different_layout_per_head": False}

# Per mode: every key the DeepSpeed class constructor accepted, with the constructor's default (not the JSON
# reader's: BigBird's num_random_blocks is 1 here), plus our own ``seed`` for the modes that draw random blocks.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "dense": {**_BASE},
    "fixed": {
        **_BASE,
        "num_local_blocks": 4,
        "num_global_blocks": 1,
        "attention": "bidirectional",
        "horizontal_global_attention": False,
        "num_different_global_patterns": 1,
    },
    "variable": {
        **_BASE,
        "num_random_blocks": 0,
        "local_window_blocks": [4],
        "global_block_indices": [0],
        "global_block_end_indices": None,
        "attention": "bidirectional",
        "horizontal_global_attention": False,
        "seed": 0,
    },
    "bigbird": {
        **_BASE,
        "num_random_blocks": 1,
        "num_sliding_window_blocks": 3,
        "num_global_blocks": 1,
        "attention": "bidirectional",
        "seed": 0,
    },
    "bslongformer": {
        **_BASE,
        "num_sliding_window_blocks": 3,
        "global_block_indices": [0],
        "global_block_end_indices": None,
        "attention": "bidirectional",
    },
}

MODES = tuple(_DEFAULTS)
_ATTENTIONS = ("unidirectional", "bidirectional")


def _fail(key: str, rule: str, value: Any) -> UserError:
    return UserError(f"sparse_attention.{key} {rule}, got {value!r}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(minimum: int | None) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> int:
        if not is_int(value) or (minimum is not None and value < minimum):
            raise _fail(key, "must be an integer" + ("" if minimum is None else f" >= {minimum}"), value)
        return value

    return check


def _int_list(minimum: int, nonempty: bool = False, optional: bool = False) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> list[int] | None:
        if value is None and optional:
            return None
        if (
            not isinstance(value, list | tuple)
            or not all(is_int(v) and v >= minimum for v in value)
            or (nonempty and not value)
        ):
            what = "a non-empty list" if nonempty else "a list"
            raise _fail(key, f"must be {what} of integers >= {minimum}" + (" or null" if optional else ""), value)
        return list(value)

    return check


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, "must be true or false", value)
    return value


def _attention(key: str, value: Any) -> str:
    if value not in _ATTENTIONS:
        raise _fail(key, f"must be one of {', '.join(_ATTENTIONS)}", value)
    return value


# Lower bounds are the smallest values DeepSpeed's code ran with (0 windows would divide by zero or loop forever);
# negative block indices, which DeepSpeed silently wrapped around, are refused.
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "block": _int_at_least(1),
    "different_layout_per_head": _boolean,
    "num_local_blocks": _int_at_least(1),
    "num_global_blocks": _int_at_least(1),
    "attention": _attention,
    "horizontal_global_attention": _boolean,
    "num_different_global_patterns": _int_at_least(1),
    "num_random_blocks": _int_at_least(0),
    "local_window_blocks": _int_list(1, nonempty=True),
    "global_block_indices": _int_list(0),
    "global_block_end_indices": _int_list(0, optional=True),
    "num_sliding_window_blocks": _int_at_least(0),
    "seed": _int_at_least(None),
}
_MODE_CHECKS = {("bigbird", "num_global_blocks"): _int_at_least(0)}


def normalize_sparse_config(cfg: dict) -> dict:
    """Validate a ``sparse_attention`` dict and return a new one with every default of its mode filled in.

    Refuses what DeepSpeed refused (at construction, or with a TypeError for a key the class did not take), one
    clear line per problem, so a bad config fails before any model is built.
    """
    if not isinstance(cfg, dict):
        raise UserError(f"sparse_attention must be a mapping, got {type(cfg).__name__}")
    mode = cfg.get("mode")
    if mode not in _DEFAULTS:
        raise _fail("mode", f"must be one of {', '.join(MODES)}", mode)
    defaults = _DEFAULTS[mode]
    for key in cfg:
        if key != "mode" and key not in defaults:
            allowed = ", ".join(["mode", *defaults])
            raise UserError(f"sparse_attention.{key} is not a key of mode {mode!r}; allowed keys: {allowed}")
    out: dict[str, Any] = {"mode": mode}
    for key, default in defaults.items():
        value = cfg.get(key, default)
        out[key] = _MODE_CHECKS.get((mode, key), _CHECKS[key])(key, value)

    if out.get("horizontal_global_attention") and out["attention"] != "bidirectional":
        raise _fail("horizontal_global_attention", "needs attention 'bidirectional'", out["attention"])
    if mode == "fixed":
        local, glob, patterns = out["num_local_blocks"], out["num_global_blocks"], out["num_different_global_patterns"]
        if local % glob:
            raise _fail("num_local_blocks", f"must be a multiple of num_global_blocks ({glob})", local)
        if patterns > 1 and not out["different_layout_per_head"]:
            raise _fail("num_different_global_patterns", "> 1 needs different_layout_per_head true", patterns)
        if patterns > local // glob:
            rule = f"cannot exceed num_local_blocks // num_global_blocks ({local} // {glob} = {local // glob})"
            raise _fail("num_different_global_patterns", rule, patterns)
    if out.get("global_block_end_indices") is not None:
        starts, ends = out["global_block_indices"], out["global_block_end_indices"]
        if len(starts) != len(ends):
            rule = f"must have as many entries as global_block_indices ({len(starts)})"
            raise _fail("global_block_end_indices", rule, ends)
        for start, end in zip(starts, ends, strict=True):
            if start >= end:
                rule = f"must be greater than the matching global_block_indices entry (start {start}, end {end})"
                raise _fail("global_block_end_indices", rule, ends)
    if mode == "bigbird" and out["attention"] == "unidirectional" and out["num_random_blocks"] > 1:
        # Row r draws from blocks 0..r, so row 0 has a single candidate: DeepSpeed's random.sample failed here.
        raise _fail(
            "num_random_blocks",
            "must be 0 or 1 with unidirectional bigbird (block row 0 sees one block)",
            out["num_random_blocks"],
        )
    return out
