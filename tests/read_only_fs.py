"""The local disk behind pyarrow's filesystem-handler API, for tests that watch or break the
reads of the training-data readers (counting the bytes a reader takes, failing reads as a
throttled object store does) while the readers under test run unchanged."""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs


class ReadOnlyLocalFs(pafs.FileSystemHandler):
    """The local filesystem, read only: a subclass overrides :meth:`open_input_file`."""

    name = "read-only"

    def __init__(self) -> None:
        self.fs = pafs.LocalFileSystem()

    def get_type_name(self) -> str:
        return self.name

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def equals(self, other: Any) -> bool:
        return other is self

    def get_file_info(self, paths: Any) -> Any:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: Any) -> Any:
        return self.fs.get_file_info(selector)

    def open_input_file(self, path: str) -> Any:
        return self.fs.open_input_file(path)

    def open_input_stream(self, path: str) -> Any:
        return self.open_input_file(path)

    def _writes(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("the shards are only read")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _writes
    delete_file = move = copy_file = open_output_stream = open_append_stream = _writes


def read_shards_through(monkeypatch: Any, handler: ReadOnlyLocalFs) -> None:
    """Make every training-data reader read the shards through ``handler``."""
    from radjepa import training_data

    real = training_data.shard_files

    def through(data: str, listed: Any = ()) -> tuple[Any, list[str]]:
        _, files = real(data, listed)
        return pafs.PyFileSystem(handler), files

    monkeypatch.setattr(training_data, "shard_files", through)
