"""The Ray Data source every cluster read of the shards goes through (the training stream,
``radjepa embed``): each shard read row group by row group, its pages checked against the
checksums ingest writes with them.

Ray Data's own Parquet reader (2.60, datasource v2) sets the scan's fragment options itself
and drops any given to ``read_parquet``: no page checksum was verified, so bytes a failing
disk or a bad copy changed inside a shard's pixel pages decoded as images and were trained
on, or embedded and served as similar cases, with nothing said. A file-based source reads
each file with pyarrow's checks on and names the damaged shard. It reads the files it is
given (``ShardSummary.files``, :func:`radjepa.shards.shard_files`), looking up their sizes
once when the dataset is made, and has no footer-reading actors to start for every pass
over the data (Ray's reader started 32 per epoch, whatever the number of files).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource, FileShuffleConfig

from radjepa.error_text import error_line
from radjepa.locations import spell_like
from radjepa.log_filters import HideErrors
from radjepa.shards import DamagedShardError, ShardError, corrupted_shard, is_damage_error

__all__ = ["ShardSource", "read_shards"]

# the loggers Ray Data says a read task's error on, where it runs the dataset (the driver for
# `radjepa embed`, the training stream's coordinator actor): "Ray Data or Ray Core internal
# code ... open an issue" and the whole traceback, for errors of ours that name the shard
_READ_ERROR_LOGGERS = (
    "ray.data.exceptions",
    "ray.data._internal.execution.streaming_executor_state",
    "ray.data._internal.execution.streaming_executor",
    "ray.data._internal.iterator.stream_split_iterator",
)
# where a Ray Train worker says its training function's error, with the whole traceback
_TRAIN_ERROR_LOGGER = "ray.train.v2._internal.util"

# rows per read: a shard is one row group of thousands of images (128 MiB at 2048 x 256 px),
# read a batch of pages at a time rather than materialised whole (Ray still shapes what is
# read into blocks of its target size, 128 MiB)
_BLOCK_ROWS = 256


class ShardSource(FileBasedDatasource):
    """``columns`` of the shard ``files`` (paths on ``filesystem``), read ``_BLOCK_ROWS``
    rows at a time, in an order ``shuffle`` draws again for every pass (Ray numbers each
    execution)."""

    def __init__(
        self,
        files: Sequence[str],
        *,
        filesystem: pafs.FileSystem,
        columns: Sequence[str] | None,
        shown: str,
        shuffle: FileShuffleConfig | None = None,
    ) -> None:
        super().__init__(list(files), filesystem=filesystem, shuffle=shuffle)
        self._columns = list(columns) if columns is not None else None
        self._shown = shown  # the location as the user spells it, for the shard's name
        self._shard_fs = filesystem

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: Any = None,
    ) -> Any:
        # called where the dataset runs: the process whose Ray Data logs the read's errors
        hide_shard_errors()
        return super().get_read_tasks(parallelism, per_task_row_limit, data_context)

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
        # a Parquet file is read from its footer back: random access, not Ray's input stream
        try:
            return filesystem.open_input_file(path)
        except FileNotFoundError:  # pyarrow's names the path alone, in a task's traceback
            raise ShardError(
                f"{spell_like(self._shown, path)} was removed while the shards were read"
            ) from None

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        try:
            shard = pq.ParquetFile(f, page_checksum_verification=True)
        except (pa.ArrowException, OSError) as err:
            raise self._damaged(err, path, footer=True) from None
        lacking = [c for c in self._columns or () if c not in shard.schema_arrow.names]
        if lacking:  # read, it failed as pyarrow's "No match for FieldRef" (ArrowInvalid)
            raise DamagedShardError(
                f"{spell_like(self._shown, path)} has no {', '.join(lacking)} column: a file "
                "of another schema among the shards (ingest writes every column); move it out"
            )
        batches = shard.iter_batches(batch_size=_BLOCK_ROWS, columns=self._columns)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as err:
                raise self._damaged(err, path, footer=False) from None
            yield pa.Table.from_batches([batch])

    def _damaged(self, err: BaseException, path: str, *, footer: bool) -> BaseException:
        """The error to stop the read with: one naming the shard when its bytes are wrong
        (``footer``: it is no whole Parquet file, as a write cut short leaves one; else its
        pages fail their checksums or no longer decode), else the storage's own, which Ray
        retries where it may."""
        if not is_damage_error(self._shard_fs, err):
            return err
        from radjepa.ingest.destination import damaged_file

        reason = error_line(err)
        shown = spell_like(self._shown, path)
        message = damaged_file(shown, reason) if footer else corrupted_shard(shown, reason)
        return DamagedShardError(message)


def read_shards(
    files: Sequence[str],
    *,
    filesystem: pafs.FileSystem,
    shown: str,
    columns: Sequence[str] | None = None,
    shuffle: FileShuffleConfig | None = None,
) -> Any:
    """A Ray Dataset of ``columns`` of the shard ``files`` (see :class:`ShardSource`)."""
    import ray.data

    source = ShardSource(
        files, filesystem=filesystem, columns=columns, shown=shown, shuffle=shuffle
    )
    return ray.data.read_datasource(source)


def hide_shard_errors(*, training_worker: bool = False) -> None:
    """Keep Ray Data's report of a shard error (:class:`ShardError`: damaged, gone, of another
    schema) off this process's terminal, in its log file only: Ray Data takes it for an
    internal error of its own (advice to open an issue, then the whole stack trace), above
    the one line the command says it in. ``training_worker``: a Ray Train worker's report of
    it (the training function's error, its traceback through Ray Data) is dropped too. Every
    other error is reported as Ray does."""
    loggers = [(name, False) for name in _READ_ERROR_LOGGERS]
    if training_worker:
        loggers.append((_TRAIN_ERROR_LOGGER, True))
    for name, drop in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, HideErrors) for f in logger.filters):
            logger.addFilter(HideErrors(ShardError, drop=drop))
