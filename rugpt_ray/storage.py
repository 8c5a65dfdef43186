"""Files in a local folder or behind a URI (s3://, gs://, file://), through pyarrow filesystems.

Runs, sweeps, prepared data and plots may all live on object storage on a cluster; everything that reads or writes
them goes through these few functions. Writes are atomic: a file is never seen half-written.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from typing import TYPE_CHECKING

from rugpt_ray.errors import UserError, cause_line

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    """`s3://...`, `gs://...`, `file:///...`: opened through pyarrow filesystems instead of `open()`."""
    return "://" in path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it; local paths become absolute (Ray workers have another cwd)."""
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(query_last(path))
    return pafs.LocalFileSystem(), os.path.abspath(path)


def query_last(uri: str) -> str:
    """A URI whose options (`?endpoint_override=...`) came before the folders joined to it with "/" (a storage_path
    such as `s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http`, then `/name/metrics.jsonl`), with the
    options moved to the end, where pyarrow reads them. The joined path starts at the first "/" of the options that
    is not part of a scheme's "://" (an endpoint is a host and a port, never a path)."""
    base, mark, options = uri.partition("?")
    joined = re.search(r"(?<!:)(?<!:/)/", options) if mark else None
    if joined is None:
        return uri
    return f"{base}{options[joined.start():]}?{options[:joined.start()]}"


def read_text(path: str) -> str | None:
    """A text file, local or behind a URI; None when there is none."""
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        return None


def write_file(path: str, data: str | bytes) -> None:
    """A file, local or behind a URI, written under a temporary name and then moved: never seen half-written."""
    fs, inner = filesystem(path)
    fs.create_dir(posixpath.dirname(inner), recursive=True)
    with fs.open_output_stream(inner + ".tmp") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    fs.move(inner + ".tmp", inner)


def subfolders(path: str, pattern: str = "*") -> list[str]:
    """Names of the folders in `path` matching a glob pattern, sorted; [] when `path` does not exist."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    entries = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(e.base_name for e in entries
                  if e.type == pafs.FileType.Directory and fnmatch.fnmatch(e.base_name, pattern))


def check_writable(path: str, what: str) -> None:
    """One line naming `what` before any work when the URI `path` cannot be written: a bucket that does not exist,
    credentials the store refuses, an endpoint that does not answer, a query key pyarrow does not know (local
    paths: nothing to check)."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return
    try:
        fs, inner = filesystem(path)
        if isinstance(fs, pafs.LocalFileSystem):  # file://: a local folder, no bucket (made when first written)
            return
        bucket = inner.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise UserError(f"{what} {query_last(path)}: bucket {bucket!r} does not exist (create it first)")
        probe = f"{inner.rstrip('/')}/.rugpt-write-probe"
        with fs.open_output_stream(probe) as f:
            f.write(b"")
        fs.delete_file(probe)
    except (OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{what} {query_last(path)}: not writable: {cause_line(e)}") from e
