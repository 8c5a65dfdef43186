"""Which text files the user means: file.list, folder, glob, single file, remote URI, or a list of these.

A `.jsonl` file is chat data (one conversation per line, `rugpt_ray.data.chat`); every other file is text.

Resolution only lists and stats files (no reading of their text), so every missing path is found and reported
in one error before any work starts. Ray-free and cheap to import: the CLI and `evaluate` use it directly.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import posixpath
from collections.abc import Iterable

from rugpt_ray.errors import UserError
from rugpt_ray.storage import is_uri

TEXT_SUFFIX = ".txt"
CHAT_SUFFIX = ".jsonl"
LIST_SUFFIX = ".list"
GLOB_CHARS = frozenset("*?[")

Inputs = str | os.PathLike | Iterable[str | os.PathLike]


class _Resolver:
    """Collects found files with their sizes and every problem, so all of them are reported at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._lists_seen: set[str] = set()

    def resolve(self, inputs: Inputs) -> dict[str, int]:
        specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        if not specs:
            raise UserError("no inputs given")
        found: dict[str, int] = {}
        for spec in specs:
            self._spec(os.fspath(spec), "", found)
        return found

    def raise_problems(self) -> None:
        if self.problems:
            n = len(self.problems)
            raise UserError(f"{n} input path{'s' if n > 1 else ''} not found: {'; '.join(self.problems)}")

    def _spec(self, spec: str, where: str, found: dict[str, int]) -> None:
        if is_uri(spec):
            self._uri(spec, where, found)
        elif GLOB_CHARS & set(spec):
            matches = sorted(glob.glob(os.path.abspath(os.path.expanduser(spec)), recursive=True))
            if not matches:
                self.problems.append(f"{spec}{where} (matches nothing)")
            for match in matches:
                self._local(match, spec, where, found)
        else:
            self._local(os.path.abspath(os.path.expanduser(spec)), spec, where, found)

    def _local(self, path: str, spec: str, where: str, found: dict[str, int]) -> None:
        if os.path.isdir(path):
            files = glob.glob(os.path.join(glob.escape(path), "**", "*" + TEXT_SUFFIX), recursive=True)
            files = [f for f in files if os.path.isfile(f)]
            if not files:
                self.problems.append(f"{spec}{where} (folder has no {TEXT_SUFFIX} files)")
            found.update((f, os.path.getsize(f)) for f in files)
        elif os.path.isfile(path):
            if path.endswith(LIST_SUFFIX):
                with open(path, "rb") as f:
                    self._list(path, f.read(), found)
            else:
                found[path] = os.path.getsize(path)
        else:
            self.problems.append(f"{spec}{where}")

    def _uri(self, spec: str, where: str, found: dict[str, int]) -> None:
        import pyarrow as pa
        import pyarrow.fs as pafs

        pattern = None
        base = spec
        if GLOB_CHARS & set(spec.split("://", 1)[1]):
            first_glob = min(spec.find(c) for c in GLOB_CHARS if c in spec)
            pattern, base = spec, spec[: spec.rfind("/", 0, first_glob) + 1]
        try:
            fs, root = pafs.FileSystem.from_uri(base)
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.File and pattern is None:
                if spec.endswith(LIST_SUFFIX):
                    with fs.open_input_stream(root) as f:
                        self._list(spec, f.read(), found)
                else:
                    found[spec] = info.size
                return
            if info.type != pafs.FileType.Directory:
                self.problems.append(f"{spec}{where}")
                return
            listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        except (pa.ArrowException, OSError, ValueError) as e:  # bad scheme, no credentials, unreachable: one line
            self.problems.append(f"{spec}{where} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            return
        prefix, skip = base.rstrip("/") + "/", len(root.rstrip("/")) + 1
        files = {prefix + i.path[skip:]: i.size for i in listing if i.type == pafs.FileType.File}
        if pattern is not None:
            files = {u: s for u, s in files.items() if fnmatch.fnmatchcase(u, pattern)}
        else:
            files = {u: s for u, s in files.items() if u.endswith(TEXT_SUFFIX)}
        if not files:
            self.problems.append(f"{spec}{where} ({'matches nothing' if pattern else 'folder has no .txt files'})")
        found.update(files)

    def _list(self, list_path: str, data: bytes, found: dict[str, int]) -> None:
        """The seed's file.list: one path per line relative to the list's folder; blank lines and # comments skipped."""
        if list_path in self._lists_seen:
            return
        self._lists_seen.add(list_path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.problems.append(f"{list_path} (not UTF-8 text at byte {e.start})")
            return
        join = posixpath.join if is_uri(list_path) else os.path.join
        folder = posixpath.dirname(list_path) if is_uri(list_path) else os.path.dirname(list_path)
        for number, line in enumerate(text.splitlines(), 1):
            entry = line.strip()
            if entry and not entry.startswith("#"):
                path = entry if is_uri(entry) or os.path.isabs(entry) else join(folder, entry)
                self._spec(path, f" ({list_path}:{number})", found)


def resolve_input_sizes(inputs: Inputs) -> dict[str, int]:
    """Like `resolve_inputs`, with each file's size in bytes (recorded in the cache's meta.json)."""
    resolver = _Resolver()
    found = resolver.resolve(inputs)
    resolver.raise_problems()
    return dict(sorted(found.items()))


def resolve_splits(splits: dict[str, Inputs]) -> dict[str, dict[str, int]]:
    """Resolve several named input sets (train, valid) and report the problems of all of them in one error."""
    resolver = _Resolver()
    found = {name: dict(sorted(resolver.resolve(inputs).items())) for name, inputs in splits.items()}
    resolver.raise_problems()
    return found


def resolve_inputs(inputs: Inputs) -> list[str]:
    """Expand file.list / folder / glob / file / URI specs (or a list of them) into a sorted list of text files.

    Folders contribute their `*.txt` files (recursively); a `*.list` file is the seed's file list. Every missing
    path is collected and raised as ONE UserError, so a long list with three typos costs one run, not three.
    """
    return list(resolve_input_sizes(inputs))
