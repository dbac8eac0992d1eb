"""Where a cluster run keeps what outlives a worker: a local folder or object storage.

A location is a string: an absolute local path, or a URI (``s3://bucket/key`` and whatever
else pyarrow's filesystems reach). S3 takes its endpoint from ``AWS_ENDPOINT_URL`` (an
S3-compatible server) and its keys from the usual AWS variables. Writes are whole objects:
a local file is written beside its target and renamed over it, an object is put at once, so
a reader never sees half of one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from batcher.errors import ConfigError
from batcher.store.files import replacing


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def resolve(base: Path, path: str) -> str:
    """A job file's path as a location: URIs as written, local paths made absolute."""
    if is_remote(path):
        return path
    candidate = Path(path.removeprefix("file://")).expanduser()
    return str(candidate if candidate.is_absolute() else (base / candidate).resolve())


def join(location: str, *names: str) -> str:
    return "/".join([location.rstrip("/"), *names])


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``location`` and the path on it."""
    if not is_remote(location):
        return pafs.LocalFileSystem(), location
    parts = urlsplit(location)
    if parts.scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options: dict[str, object] = {}
        if endpoint:
            found = urlsplit(endpoint)
            options = {"endpoint_override": found.netloc, "scheme": found.scheme or "https"}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["region"] = region
        return pafs.S3FileSystem(**options), f"{parts.netloc}{parts.path}"
    try:
        found_fs, path = pafs.FileSystem.from_uri(location)
    except (pafs.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"{location}: no filesystem reaches it ({exc})") from None
    return found_fs, path


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return bool(fs.get_file_info(path).type == pafs.FileType.File)


def read_bytes(location: str) -> bytes | None:
    """The object's bytes, or None if there is none."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return bytes(stream.read())


def write_bytes(location: str, data: bytes) -> None:
    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        with replacing(Path(path)) as temporary:
            temporary.write_bytes(data)
        return
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def upload(local: Path, location: str) -> None:
    """Copy a local file to ``location`` whole."""
    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        with replacing(Path(path)) as temporary:
            shutil.copyfile(local, temporary)
        return
    pafs.copy_files(
        str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def download(location: str, local: Path) -> bool:
    """Copy ``location`` to a local file (written whole); False if there is nothing there."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    with replacing(local) as temporary:
        pafs.copy_files(
            path,
            str(temporary),
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
    return True


def remove_tree(location: str) -> None:
    """Delete a folder (or prefix) and everything under it, if it is there."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
