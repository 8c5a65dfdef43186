"""Random JSON schemas for the structured-output tests and benchmark: objects, nested objects, arrays, enums,
numbers with bounds, strings with lengths and `$defs` references, each bounded so that a random-weight model can
finish a valid instance within a hundred or so tokens."""

from __future__ import annotations

import random

WORDS = ["имя", "name", "возраст", "город", "tags", "score", "items", "id", "цена", "flag", "kind", "note"]


def random_schema(seed: int) -> dict:
    """A schema drawn from `seed`: an object at the root, at most three levels deep, with a `$defs` entry that
    every other schema references."""
    rng = random.Random(seed)
    defs = {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                       "y": {"type": "integer", "minimum": 0, "maximum": 99}},
                      "required": ["x", "y"], "additionalProperties": False}}
    schema = _object(rng, depth=0, with_ref=seed % 2 == 0)
    return {**schema, "$defs": defs} if seed % 2 == 0 else schema


def _object(rng: random.Random, depth: int, with_ref: bool = False) -> dict:
    names = rng.sample(WORDS, rng.randint(1, 3))
    properties = {name: _value(rng, depth + 1) for name in names}
    if with_ref:
        properties["point"] = {"$ref": "#/$defs/point"}
    required = [name for name in properties if rng.random() < 0.7]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _value(rng: random.Random, depth: int) -> dict:
    kinds = ["string", "integer", "number", "boolean", "enum"] + (["object", "array"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        low = rng.randint(0, 3)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(1, 8)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        low = rng.choice([0, -1.5, 10])
        return {"type": "number", "minimum": low, "maximum": low + rng.choice([1, 100])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["да", "нет", "red", "green", 1, 2.5, None, True], rng.randint(1, 4))}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": _value(rng, depth + 1), "minItems": low, "maxItems": low + rng.randint(0, 3)}
    return _object(rng, depth)


SCHEMAS = [random_schema(seed) for seed in range(24)]
