"""Waiting in tests without betting on the machine's speed: `poll` waits for an observable state with a deadline,
and `bare_sleeps` finds sleeps that are not part of such a wait (the rule conftest.py enforces on the serving
tests: a fixed sleep followed by an exact assertion passes or fails with the machine's load)."""

from __future__ import annotations

import ast
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SLEEPS = {"sleep"}  # time.sleep, asyncio.sleep, trio.sleep, or a bare `sleep` imported from one of them


def poll(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call `predicate` until it returns something truthy and return that; AssertionError naming `what` (and the
    last value seen) when `timeout` seconds pass first. The deadline only bounds a wait for a state that comes:
    the test asserts the state, never how long it took."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}; last seen: {value!r}")
        time.sleep(interval)


def _is_sleep(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr in SLEEPS) or (isinstance(func, ast.Name)
                                                                         and func.id in SLEEPS)


def bare_sleeps(path: Path) -> list[str]:
    """`file:line` of every sleep call in the module at `path` that is not inside a `while` loop (a wait that polls
    for a state has one; a fixed pause before an assertion does not)."""
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    found = []

    def visit(node: ast.AST, in_while: bool) -> None:
        if _is_sleep(node) and not in_while:
            found.append(f"{path}:{node.lineno}")
        for child in ast.iter_child_nodes(node):
            # a nested function is a separate wait: a `while` around its definition does not make it poll
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, (in_while or isinstance(node, ast.While)) and not nested)

    visit(tree, False)
    return found
