"""What a pretraining run reads from an ingest output: the hold-out split, the checks made
before any cluster work, and the decode of each streamed batch.

Plain pyarrow and numpy, so the Ray job, a sweep's trials and the tests share one definition
of which images are trained on; ``pipelines.pretrain`` only wires these into Ray Data.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from radjepa.config import Config
from radjepa.error_text import error_line
from radjepa.locations import spell_like
from radjepa.shards import (
    ForeignFilesError,
    ShardError,
    corrupted_shard,
    is_damage_error,
    pixel_batch,
    require_columns,
    shard_files,
    shard_folder,
    shard_scan_options,
)

__all__ = [
    "TRAINING_COLUMNS",
    "ShardSummary",
    "TrainingDataError",
    "check_global_batch",
    "decode_mismatch",
    "decode_training_batch",
    "inspect_shards",
    "is_holdout",
    "shard_dataset",
    "stored_decode",
    "training_files",
    "with_stored_decode",
]

log = logging.getLogger(__name__)

# the columns a training stream reads (never the metadata the images carry)
TRAINING_COLUMNS = ["image_id", "pixels", "height", "width", "dtype"]


class TrainingDataError(ValueError):
    """The shards and the config do not make a trainable run (phrased for the user)."""


@dataclass(frozen=True)
class ShardSummary:
    """What :func:`inspect_shards` learnt from the shard metadata (no pixels read)."""

    images_dir: str
    rows: int
    train_rows: int
    holdout_rows: int
    size: int
    dtype: str
    # which images these are, whatever the shard layout: sha256 over the sorted image ids (each
    # the content id of its source file, radjepa.imaging.deid.content_id) and the stored size
    # and dtype; MLflow records it per run
    fingerprint: str = ""
    # the ingest.window_percentiles the DST's manifest records (None: not an ingest DST)
    window: tuple[float, float] | None = None
    # the shard files these images are in (:func:`training_files`): the run reads these, not
    # a later listing, which an ingest adding to the DST meanwhile would make another set
    files: tuple[str, ...] = ()


def training_files(data: str, files: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """The shard files a run trains on (:func:`radjepa.shards.shard_files`: in an ingest DST
    exactly those ingest wrote) and their pyarrow filesystem. Every reader of a run takes this
    list rather than the folder: Ray Data and pyarrow read every ``*.parquet`` of a folder
    (and of its subfolders), which the listing refuses or leaves out.

    ``files`` (``ShardSummary.files``, the listing the run was inspected with) are taken as
    they are: a sweep trial starting hours after its driver's inspection listed the folder
    again, and trained on shards an ingest had added since, which the run's data fingerprint
    and row counts did not cover and the sweep's other trials never saw."""
    try:
        return shard_files(data, files)
    except ForeignFilesError as exc:  # there are shards: the message says what else is there
        raise TrainingDataError(str(exc)) from None
    except ShardError as exc:
        raise TrainingDataError(f"no shards at {data}: {exc}") from None
    except (OSError, ValueError) as exc:  # unknown URI scheme, unreachable bucket, ...
        raise TrainingDataError(f"cannot read shards at {data}: {exc}") from None


def shard_dataset(data: str) -> Any:
    """A ``pyarrow.dataset`` over exactly :func:`training_files`, its pages checked against
    their checksums (:func:`radjepa.shards.shard_scan_options`)."""
    return _checked_dataset(*training_files(data))


def _checked_dataset(fs: Any, files: Sequence[str]) -> Any:
    import pyarrow.dataset as pads

    parquet = pads.ParquetFileFormat(default_fragment_scan_options=shard_scan_options())
    return pads.dataset(list(files), format=parquet, filesystem=fs)


def is_holdout(image_id: str, fraction: float) -> bool:
    """Deterministic hold-out by content hash: the same image is held out on every run, on
    every worker and in every sweep trial, with nothing to store or to agree on."""
    if fraction <= 0:
        return False
    h = int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def inspect_shards(data: str, cfg: Config, files: Sequence[str] = ()) -> ShardSummary:
    """Read shard metadata (not pixels) to fail in seconds, before a cluster is asked for
    workers, when the config cannot train on this data. ``files``: the shard files to inspect
    (a resumed sweep's, as it was started on them; :func:`training_files`), else the folder's
    listing."""
    columns = ["image_id", "height", "width", "dtype"]
    fs, files = training_files(data, files)  # listed once: the files the run then reads
    with _named_damage(data, columns, files):
        ds = _checked_dataset(fs, files)
        images = shard_folder(data)
        try:
            require_columns(ds.schema.names, data, columns)
        except ShardError as exc:
            raise TrainingDataError(str(exc)) from None
        table = ds.to_table(columns=columns)
    if table.num_rows == 0:
        raise TrainingDataError(f"{images} has shards but no images (everything was quarantined?)")
    # the schema is the first shard's: a later one without a column reads as nulls there
    lacking = [c for c in columns if table.column(c).null_count]
    if lacking:
        raise TrainingDataError(
            f"shards at {data} hold images without {', '.join(lacking)}: a shard of another "
            "schema is among them (ingest writes every column); move it out of the folder"
        )
    heights = set(table.column("height").to_pylist())
    widths = set(table.column("width").to_pylist())
    dtypes = set(table.column("dtype").to_pylist())
    if len(heights | widths) != 1 or len(dtypes) != 1:
        raise TrainingDataError(
            f"shards mix image sizes {sorted(heights | widths)} or dtypes {sorted(dtypes)}; "
            "ingest each archive with one ingest.image_size/dtype"
        )
    size = heights.pop()
    if cfg.data.crop_size > size:
        raise TrainingDataError(
            f"data.crop_size={cfg.data.crop_size} is larger than the stored images ({size} px); "
            f"lower data.crop_size/model.img_size or re-ingest with ingest.image_size >= "
            f"{cfg.data.crop_size}"
        )
    ids = table.column("image_id").to_pylist()
    held = sum(is_holdout(i, cfg.data.holdout_fraction) for i in ids)
    n_train = len(ids) - held
    check_global_batch(n_train, cfg)
    dtype = dtypes.pop()
    digest = hashlib.sha256(f"{size}\n{dtype}\n".encode())
    for image_id in sorted(ids):
        digest.update(f"{image_id}\n".encode())
    window = _recorded_window(data)
    return ShardSummary(
        images, len(ids), n_train, held, size, dtype, digest.hexdigest(), window, tuple(files)
    )


@contextmanager
def _named_damage(data: str, columns: list[str], files: Sequence[str] = ()) -> Iterator[None]:
    """Turn pyarrow's errors reading the shards' ``columns`` into a :class:`TrainingDataError`
    that names what to do: training stopped on a traceback that named neither the file nor
    the cause. A damaged shard is named (``is_damage_error``: one that is no whole Parquet
    file, zero bytes, cut short or zeroed, as a crash or a lost node leaves one; or one whose
    pages fail their checksums or no longer decode); any other error is the storage's (an
    object store's SLOW_DOWN, a network failure) or pyarrow's, said in one line."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as err:
        try:
            fs, listed = training_files(data, files)
            damaged = is_damage_error(fs, err)
            found = _damaged_shard(data, fs, listed, columns) if damaged else None
        except (pa.ArrowException, OSError):  # the storage fails the search too: say the first
            damaged, found = False, None
        if found is not None:
            raise TrainingDataError(found) from None
        cause = error_line(err).rstrip(".")
        if damaged:  # a file's bytes are wrong, though none could be named: no outage
            advice = " (a damaged shard?)"
        else:
            advice = "; re-run when the storage answers" if isinstance(err, OSError) else ""
        raise TrainingDataError(f"cannot read the shards at {data}: {cause}{advice}") from None


def _damaged_shard(data: str, fs: Any, files: list[str], columns: list[str]) -> str | None:
    """The message naming the first shard whose footer, or whose pages of ``columns``, cannot
    be read as written (a file cut short or zeroed, bytes changed after ingest: checksums, a
    page header or compressed block that no longer decodes); None when none is found. Read
    only once a read has failed with an error of damage, file by file up to the first damaged
    one (each file is a request on an object store: tens of thousands to name every one)."""
    from radjepa.ingest.destination import damaged_file, footer_error

    for path in files:
        reason = footer_error(fs, path)
        if reason is not None:
            return damaged_file(spell_like(data, path), reason)
        if (reason := _page_error(fs, path, columns)) is not None:
            return corrupted_shard(spell_like(data, path), reason)
    return None


def _page_error(fs: Any, path: str, columns: list[str]) -> str | None:
    """Why the pages of ``columns`` of the shard ``path`` cannot be read as written (their
    checksums fail, or they no longer decode); None when they read. The storage's errors are
    raised."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.read_table(path, columns=columns, filesystem=fs, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as err:
        if is_damage_error(fs, err):
            return error_line(err)
        raise
    return None


def _recorded_window(data: str) -> tuple[float, float] | None:
    from radjepa.ingest.destination import recorded_window
    from radjepa.ingest.errors import IngestError

    try:
        return recorded_window(data)
    except (IngestError, OSError, ValueError) as err:  # a damaged manifest: the shards stand
        log.warning("cannot read the window the shards were ingested with: %s", err)
        return None


def with_stored_decode(cfg: Config, info: ShardSummary) -> Config:
    """``cfg`` with its ``ingest`` section set to how the shards were made (stored size and
    dtype, and the DST's window), which the checkpoint records.

    The served model decodes uploads with the checkpoint's ingest settings (as do the probe and
    the similar-case search's queries): a run trained on shards ingested with settings other
    than its config's (``--set ingest.image_size=512`` at ingest, the defaults at pretrain)
    recorded the config's, and served uploads windowed or scaled otherwise than every image
    it learnt from, without a word."""
    differ, said = _differing(_made_with(info.size, info.dtype, info.window), cfg)
    if not differ:
        return cfg
    log.warning(
        "the shards were ingested with %s, the config says %s: the run records the shards' "
        "settings, which the served model decodes uploads with",
        ", ".join(f"{k}={v}" for k, v in differ.items()),
        ", ".join(f"{k}={said[k]}" for k in differ),
    )
    from radjepa.config import ConfigError

    try:
        return cfg.with_overrides(differ)
    except ConfigError as err:  # another section bound to them (a crop the size cannot hold)
        raise TrainingDataError(f"the config cannot take the shards' settings: {err}") from None


def _made_with(
    size: int | None, dtype: str | None, window: tuple[float, float] | None
) -> dict[str, Any]:
    """Shard settings as the config keys that name them (those known: not None)."""
    made = {"ingest.image_size": size, "ingest.dtype": dtype, "ingest.window_percentiles": window}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in made.items() if v is not None}


def _differing(made: dict[str, Any], cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings of ``made`` that ``cfg``'s ingest section says otherwise, and what it says."""
    ing = cfg.ingest
    said = {
        "ingest.image_size": ing.image_size,
        "ingest.dtype": ing.dtype,
        "ingest.window_percentiles": [float(v) for v in ing.window_percentiles],
    }
    return {k: v for k, v in made.items() if said[k] != v}, said


def stored_decode(data: str) -> dict[str, Any]:
    """How the shards at ``data`` were made, as :func:`with_stored_decode` names it
    (``ingest.image_size``, ``ingest.dtype`` and, where the DST records it,
    ``ingest.window_percentiles``); only the size and dtype columns are read."""
    columns = ["height", "width", "dtype"]
    with _named_damage(data, columns):
        table = shard_dataset(data).to_table(columns=columns)
    sizes = set(table.column("height").to_pylist()) | set(table.column("width").to_pylist())
    dtypes = set(table.column("dtype").to_pylist())
    return _made_with(
        sizes.pop() if len(sizes) == 1 else None,
        dtypes.pop() if len(dtypes) == 1 else None,
        _recorded_window(data),
    )


def decode_mismatch(data: str, cfg: Config) -> str | None:
    """In words, how the shards at ``data`` were made otherwise than the checkpoint config
    ``cfg`` decodes uploads; None when they agree. The served model decodes a query with the
    checkpoint's settings: an index of shards made otherwise compares pixels windowed or
    scaled otherwise."""
    made = stored_decode(data)
    differ, served = _differing(made, cfg)
    if not differ:
        return None
    return (
        f"the shards at {data} were made with "
        + ", ".join(f"{k}={made[k]}" for k in differ)
        + "; the model decodes uploads with "
        + ", ".join(f"{k}={served[k]}" for k in differ)
    )


def check_global_batch(n_train: int, cfg: Config) -> None:
    """Every worker needs at least one full batch per pass (0 workers = auto: checked once the
    cluster has said how many, at least one)."""
    workers = max(1, cfg.train.num_workers)
    global_batch = cfg.train.batch_size * workers
    if n_train < global_batch:
        raise TrainingDataError(
            f"only {n_train} training images for a global batch of {global_batch} "
            f"(train.batch_size={cfg.train.batch_size} x train.num_workers={workers}); "
            "lower the batch size or ingest more images"
        )


def decode_training_batch(batch: Any, holdout_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """Shard rows (an Arrow table or record batch) -> ``image`` [B, H, W] without the hold-out.

    The pixels come out of the Arrow buffer in one piece (:func:`radjepa.shards.pixel_batch`);
    the hold-out is dropped here rather than by a row-wise filter, which in Ray Data turns every
    row (pixel bytes included) into a Python dict first.
    """
    images = pixel_batch(batch)
    if holdout_fraction > 0:
        ids = batch.column("image_id").to_pylist()
        keep = np.fromiter((not is_holdout(i, holdout_fraction) for i in ids), bool, len(ids))
        images = images[keep]
    return {"image": images}
