"""``radjepa embed``: a Ray Data batch job turning ingest shards into an embeddings index.

Shards (``DST/images/*.parquet``) -> an actor pool holding the TARGET encoder (loaded once per
actor, GPU when the cluster has one) -> Parquet with ``image_id``, the pseudonymised ids, the
model label, the checkpoint fingerprint (``encoder_sha256``: the server refuses the index for
any other checkpoint), the fingerprint of the key and the patient identity scheme that made the
shards' pseudonyms (``pseudonym_key_fingerprint``, ``patient_identity``, from the ingest key
record; null for shards that record none: the server pseudonymises an upload's own PatientID
with them only when its key matches), how the shards' image ids were made
(``image_id_scheme``: keyed ``hmac-sha256``, or the unkeyed ``sha256`` of DSTs made before
ids were keyed and of shards that record nothing; the server hashes an upload the same way to
recognise it in the archive) and a fixed-size-list ``embedding`` column.
``serve.index.EmbeddingIndex`` reads that output for ``/v1/similar``. The encoder sees exactly what
the served model sees: stored pixels -> ``radjepa.transforms.prepare_images`` ->
``encoder.embed`` (average-pooled patch tokens), in :class:`radjepa.inference.EncoderRunner`, the
code the server runs.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radjepa.config import Config
from radjepa.imaging.contract import PID_FIELDS

__all__ = ["EmbedError", "EmbedResult", "run_embed", "OUTPUT_COLUMNS"]

log = logging.getLogger(__name__)

PID_COLUMNS = PID_FIELDS
OUTPUT_COLUMNS = (
    "image_id",
    *PID_COLUMNS,
    "model",
    "encoder_sha256",
    "pseudonym_key_fingerprint",
    "patient_identity",
    "image_id_scheme",
    "embedding",
)


class EmbedError(RuntimeError):
    """A problem the user can fix: missing shards, unreadable model, occupied output folder."""


@dataclass(frozen=True)
class EmbedResult:
    out: str  # the folder or URI given
    rows: int
    dim: int
    model: str
    encoder_sha256: str
    pseudonym_key_fingerprint: str | None = None  # None: the shards record no key
    patient_identity: str | None = None
    image_id_scheme: str = "sha256"  # the shards': unkeyed when they record none


class _EmbedActor:
    """Holds the served model's runner; one ``__call__`` = one forward over a batch of stored
    images, through the same ``EncoderRunner`` the Serve deployment uses.

    Each actor resolves the model itself, as a Serve replica does: on a cluster it may run on a
    node where the driver's downloaded copy does not exist. The reference is the driver's pinned
    one and the weights must hash to the driver's fingerprint, which the index records.
    """

    def __init__(
        self,
        model_ref: str,
        tracking_uri: str | None,
        model_label: str | None,
        encoder_sha256: str,
        device: str,
        pseudonyms: dict[str, str | None] | None = None,
    ) -> None:
        from radjepa.inference import EncoderRunner
        from serve.registry import resolve_model

        resolved = resolve_model(model_ref, tracking_uri=tracking_uri)
        self.runner = EncoderRunner.from_checkpoint(resolved.path, device=device)
        if self.runner.fingerprint != encoder_sha256:
            raise EmbedError(
                f"{model_ref} on this node is not the checkpoint the driver resolved "
                f"(encoder {str(self.runner.fingerprint)[:12]} vs {encoder_sha256[:12]}): "
                "give the model as a URI or models:/ reference every node can read"
            )
        info = self.runner.info
        self.label = model_label or f"{info.name}:{info.version}"  # as the server names it
        self.encoder_sha256 = encoder_sha256
        self.pseudonyms = pseudonyms or {}

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        from radjepa.shards import pixels_from_bytes

        images = [
            pixels_from_bytes(b, int(h), int(w), str(dt))
            for b, h, w, dt in zip(
                batch["pixels"], batch["height"], batch["width"], batch["dtype"], strict=True
            )
        ]
        results = self.runner.run(images, [False] * len(images))
        emb = np.stack([r.embedding for r in results])  # [B, D]
        n, dim = emb.shape
        cols: dict[str, Any] = {"image_id": pa.array(batch["image_id"].tolist(), pa.string())}
        for c in PID_COLUMNS:
            values = batch[c].tolist() if c in batch else [None] * n
            cols[c] = pa.array(values, pa.string())
        cols["model"] = pa.array([self.label] * n, pa.string())
        cols["encoder_sha256"] = pa.array([self.encoder_sha256] * n, pa.string())
        for c, key in (
            ("pseudonym_key_fingerprint", "key_fingerprint"),
            ("patient_identity", "patient_identity"),
            ("image_id_scheme", "id_scheme"),
        ):
            cols[c] = pa.array([self.pseudonyms.get(key)] * n, pa.string())
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(emb.reshape(-1), pa.float32()), dim
        )
        return pa.table(cols)


def run_embed(
    cfg: Config,
    shards_dir: str | Path,
    out: str | Path,
    *,
    model: str | Path,
    tracking_uri: str | None = None,
    batch_size: int | None = None,
    actors: int | None = None,
) -> EmbedResult:
    """Embed every stored image under ``shards_dir`` into Parquet under ``out``.

    ``model`` is a checkpoint or run folder, either as a URI, or a ``models:/`` reference
    looked up in ``tracking_uri``. A local folder must be on every node that runs an actor.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import ray
    from ray.data.datasource import FilenameProvider

    from pipelines.runtime import (
        ensure_ray,
        env_names_cluster,
        remote_error_message,
        resolve_use_gpu,
    )
    from pipelines.shard_source import read_shards
    from radjepa.checkpoint import CheckpointError, saved_config
    from radjepa.eval.heads import HeadError, checkpoint_fingerprint
    from radjepa.ingest.destination import id_scheme_of, recorded_pseudonyms
    from radjepa.ingest.errors import IngestError
    from radjepa.locations import filesystem, spell_like
    from radjepa.shards import ShardError, require_columns, shard_files
    from serve.index import INCOMPLETE_MARKER
    from serve.registry import ModelNotFound, resolve_model

    try:
        shard_fs, shard_paths = shard_files(shards_dir)
        shards = [spell_like(str(shards_dir), p) for p in shard_paths]
        # before Ray: an embeddings index given as SHARDS was refused only once Ray had started
        present = pq.read_schema(shards[0]).names
        require_columns(present, shards_dir, ["image_id", "pixels", "height", "width", "dtype"])
    except ShardError as err:
        raise EmbedError(str(err)) from None
    except (OSError, pa.ArrowException) as err:  # storage that does not answer: a traceback
        raise EmbedError(f"cannot read shards at {shards_dir}: {err}") from None
    try:
        resolved = resolve_model(str(model), tracking_uri=tracking_uri)
        # every actor reads meta.json first; a folder without one (the shards given as
        # --model, say) failed in each actor after Ray started: ~300 lines of retried actor
        # tracebacks before the one line that says why, and OUT left behind with its marker
        model_cfg = saved_config(resolved.path)
    except (ModelNotFound, CheckpointError) as err:
        raise EmbedError(str(err)) from None
    model_label = f"{resolved.name}:{resolved.version}" if resolved.name else None
    out = str(out)  # a folder or any pyarrow URI: the job may run on a cluster
    try:
        out_fs, out_path = filesystem(out)
        marker = f"{out_path.rstrip('/')}/{INCOMPLETE_MARKER}"
        unfinished = out_fs.get_file_info(marker).type != pafs.FileType.NotFound
        if unfinished or _parquet_files(out_fs, out_path):
            # a marker alone is a run still starting (its actors waiting for nodes): a second
            # run beside it wrote its parts into the same folder, and both were recorded
            what = (
                "the parts of an embed run that is writing there or did not finish"
                if unfinished
                else "Parquet files"
            )
            raise EmbedError(
                f"{out} already holds {what}: choose a new folder, or remove it once no run "
                "writes there"
            )
    except (OSError, ValueError) as err:
        if isinstance(err, EmbedError):
            raise
        raise EmbedError(f"cannot use {out} for the index: {err}") from None
    try:  # hashed once here rather than in every actor
        fingerprint = checkpoint_fingerprint(resolved.path)
    except HeadError as err:
        raise EmbedError(str(err)) from None
    try:
        pseudonyms = recorded_pseudonyms(str(shards_dir))
    except IngestError as err:
        raise EmbedError(str(err)) from None
    # shards without a key record predate it, and keyed ids: theirs are the unkeyed SHA-256
    pseudonyms = {**(pseudonyms or {}), "id_scheme": id_scheme_of(pseudonyms)}
    if pseudonyms.get("key_fingerprint") is None:
        log.warning(
            "%s records no pseudonymisation key for all its shards (some or all were ingested "
            "by an older version): a server "
            "cannot check that it pseudonymises uploads with the key of these shards "
            "(exclude_same_patient says so in each answer); ingest into a new DST to record it",
            shards_dir,
        )

    _say_decode_mismatch(str(shards_dir), model_cfg)

    ensure_ray()
    use_gpu = resolve_use_gpu(cfg.serve.use_gpu, "serve.use_gpu")
    wanted = ["image_id", "pixels", "height", "width", "dtype", *PID_COLUMNS]
    columns = [c for c in wanted if c in present]
    free = ray.available_resources()
    free_cpus = int(free.get("CPU", 0))  # none free, or none yet (an autoscaled group at 0)
    batch = batch_size or cfg.probe.batch_size
    try:  # the shards' footers are read from here on: a damaged one (a copy cut short) was
        # pyarrow's traceback
        if not _any_rows(shards):  # an empty index would be written and called a success
            raise EmbedError(f"the {len(shards)} shard(s) in {shards_dir} hold no images")
        n_actors = actors or default_actors(free_cpus, use_gpu, shards, batch)
        check_actors(
            n_actors,
            free_cpus,
            int(free.get("GPU", 0)),
            use_gpu,
            chosen=bool(actors),
            cluster=env_names_cluster(),
        )
        ds = read_shards(shard_paths, filesystem=shard_fs, shown=str(shards_dir), columns=columns)
    except (OSError, pa.ArrowException) as err:
        raise EmbedError(f"cannot read shards at {shards_dir}: {err}") from None
    ds = ds.map_batches(
        _EmbedActor,
        fn_constructor_kwargs={
            "model_ref": resolved.pinned,
            "tracking_uri": tracking_uri,
            "model_label": model_label,
            "encoder_sha256": fingerprint,
            "device": "cuda" if use_gpu else "cpu",
            "pseudonyms": pseudonyms,
        },
        batch_size=batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=1,
        num_gpus=1 if use_gpu else 0,
        udf_modifying_row_count=False,
    )
    out_fs.create_dir(out_path, recursive=True)
    run = uuid.uuid4().hex[:12]  # names this run's parts and its marker
    _mark_incomplete(out_fs, marker, run)
    try:
        ds.write_parquet(out, filename_provider=FilenameProvider(run, "parquet"))
    except ray.exceptions.RayActorError as err:
        # an actor that cannot load the model on its node (another copy, no copy, unreadable):
        # Ray's error is the worker's whole traceback; the user needs its last line
        if not getattr(err, "actor_init_failed", False):
            raise
        # no actor ran, so nothing writes: the same folder may be used again. Not after a
        # Ctrl-C: Ray Data does not wait for its write tasks, whose parts may appear after
        # the folder was found empty (on a bucket, once their upload ends), and would then
        # be served without a marker as the whole archive
        _unmark_if_empty(out_fs, out_path, marker, run)
        reason = remote_error_message(err) or "see the worker log above"
        raise EmbedError(f"the encoder actors could not start: {reason}") from None
    except ShardError as err:  # a read task's (Ray's task error carries it): named, one line
        reason = remote_error_message(err) or str(err)
        raise EmbedError(
            f"{reason}. {out} holds the parts written so far, marked unfinished (never "
            "served): remove it before embedding again"
        ) from None
    try:  # the storage failing now leaves the marker: the folder is refused as unfinished
        files = _parquet_files(out_fs, out_path)
        if _marked_by(out_fs, marker) != run or any(
            not f.rsplit("/", 1)[-1].startswith(f"{run}_") for f in files
        ):
            # two runs started together past the check above: neither's parts are the index
            _mark_incomplete(out_fs, marker, run)
            raise EmbedError(
                f"another embed run wrote into {out} while this one ran: their parts are mixed "
                "there; remove the folder and embed again, one run per folder"
            )
        counts = {f: pq.read_metadata(f, filesystem=out_fs).num_rows for f in files}
        rows = sum(counts.values())
        _record_parts(out_fs, out_path, counts)
        out_fs.delete_file(marker)  # every part is written and recorded: it may be served
    except OSError as err:
        raise EmbedError(f"cannot finish the index in {out}: {err}") from None
    dim, label = 0, model_label or ""
    if files:
        field = pq.read_schema(files[0], filesystem=out_fs).field("embedding").type
        dim = int(getattr(field, "list_size", 0))
        first = pq.read_table(files[0], columns=["model"], filesystem=out_fs)
        label = str(first.column("model")[0])
    log.info(
        "embedded %d images (dim %d) with %s (encoder %s) into %s",
        rows,
        dim,
        label,
        fingerprint[:12],
        out,
    )
    return EmbedResult(
        out=out,
        rows=rows,
        dim=dim,
        model=label,
        encoder_sha256=fingerprint,
        pseudonym_key_fingerprint=pseudonyms.get("key_fingerprint"),
        patient_identity=pseudonyms.get("patient_identity"),
        image_id_scheme=str(pseudonyms["id_scheme"]),
    )


def _say_decode_mismatch(shards_dir: str, model_cfg: Config) -> None:
    """Warn when the shards were made otherwise than the model decodes uploads: the server
    compares a query decoded its way with rows made the other way (say windowed at other
    percentiles), and the similar-case search ranks them worse, without a word."""
    from radjepa.training_data import TrainingDataError, decode_mismatch

    try:
        mismatch = decode_mismatch(shards_dir, model_cfg)
    except (TrainingDataError, OSError, ValueError) as err:  # read again, and said, below
        log.debug("decode settings of %s not compared: %s", shards_dir, err)
        return
    if mismatch:
        log.warning(
            "%s: the index will hold rows made otherwise than the queries the server decodes "
            "(ingest with the model's settings into a new DST for matching rows)",
            mismatch,
        )


def _record_parts(fs: Any, folder: str, counts: dict[str, int]) -> None:
    """Write :data:`serve.index.PARTS_RECORD`: each part's name in ``folder`` and its rows, so
    that a server refuses a copy of the index that lost or gained a part."""
    import json

    from serve.index import PARTS_RECORD

    root = folder.rstrip("/") + "/"
    outside = [path for path in counts if not path.startswith(root)]
    if outside:  # a record naming it so would make the finished index unservable
        raise EmbedError(f"cannot record the index's parts: {outside[0]} is not under {folder}")
    parts = {path.removeprefix(root): n for path, n in counts.items()}
    record = {"parts": parts, "rows": sum(parts.values()), "written_by": "radjepa embed"}
    with fs.open_output_stream(root + PARTS_RECORD) as f:
        f.write(json.dumps(record, indent=1, sort_keys=True).encode())


def _unmark_if_empty(fs: Any, folder: str, marker: str, run: str) -> None:
    """Remove this run's marker from ``folder`` when it holds no part and none can appear (its
    actors never started): the folder refused would have to be removed by hand. The storage
    failing here leaves the marker, said in a warning: the run's own error is the one to
    report."""
    try:
        if not _parquet_files(fs, folder) and _marked_by(fs, marker) == run:
            fs.delete_file(marker)
    except OSError as err:
        log.warning("could not remove the marker %s of this stopped run: %s", marker, err)


def _marked_by(fs: Any, marker: str) -> str | None:
    """The run whose marker ``marker`` is (its last line), None when there is none."""
    try:
        with fs.open_input_stream(marker) as f:
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except FileNotFoundError:
        return None
    return lines[-1].removeprefix("run ") if lines else None


def _mark_incomplete(fs: Any, marker: str, run: str) -> None:
    """Mark the index folder as being written until every part is in it.

    Ray Data writes each part straight into the folder as its task ends, so a run stopped
    midway (Ctrl-C, ``radjepa jobs stop``, a preempted node, a failed actor) leaves valid
    Parquet holding only some of the archive; ``serve.index`` refuses a folder with this
    marker instead of serving that as the whole archive.
    """
    with fs.open_output_stream(marker) as f:
        f.write(
            b"radjepa embed is writing this index, or a run writing it did not finish: "
            b"its parts are not the whole archive\n" + f"run {run}\n".encode()
        )


MAX_CPU_ACTORS = 4


def check_actors(
    n: int, free_cpus: int, free_gpus: int, use_gpu: bool, chosen: bool, cluster: bool
) -> None:
    """Refuse encoder actors a local Ray instance cannot run beside the shards' read and the
    index's write tasks: each actor holds a CPU (and a GPU) for the whole run, Ray Data's tasks
    need one more, and a run without it waited for ever with no error (``--actors 2`` on 2
    CPUs). On a cluster only a warning: an autoscaler may add the nodes (a CPU group scaled to
    zero has none free until it does), or running jobs free theirs."""
    fix = "lower --actors" if chosen else "free some, or run on a larger cluster"
    problem = None
    if use_gpu and n > free_gpus:
        problem = f"{n} encoder actor(s) need {n} GPU(s); the cluster has {free_gpus} free"
    elif n + 1 > free_cpus:
        problem = (
            f"{n} encoder actor(s) hold {n} CPU(s) and reading the shards and writing the index "
            f"needs one more; the cluster has {free_cpus} free"
        )
    if problem is None:
        return
    if not cluster:
        raise EmbedError(f"{problem}: {fix}")
    log.warning("%s now: the run waits until the cluster has them", problem)


def default_actors(free_cpus: int, use_gpu: bool, shards: list[str], batch_size: int) -> int:
    """How many encoder actors an embed run starts: one with a GPU; else half the free CPUs,
    at most :data:`MAX_CPU_ACTORS`, and no more than the run has batches or blocks. Each actor
    loads torch, timm and the encoder (seconds of CPU) before its first batch, and Ray Data
    hands an actor whole blocks: it reads a shard (one row group as ingest writes it) in blocks
    of up to ``target_max_block_size`` (128 MiB) of data, so the demo's one shard of 64 images
    kept one of its two actors busy (Ray warned that the other could get no input), and one
    shard of 1000 rows of 64 KiB went to one of four actors, 3000 such rows to two."""
    if use_gpu:
        return 1
    wanted = max(1, min(MAX_CPU_ACTORS, free_cpus // 2))
    rows, blocks = _rows_and_blocks_up_to(shards, wanted * batch_size, wanted)
    return max(1, min(wanted, -(-rows // batch_size), blocks))


def _rows_and_blocks_up_to(
    shards: list[str], rows_limit: int, blocks_limit: int
) -> tuple[int, int]:
    """The shards' rows and the blocks Ray Data reads them in (each shard's data over the
    block size, rounded up), from their footers until both limits are reached (a large
    archive on object storage is not read footer by footer for it)."""
    import pyarrow.parquet as pq
    from ray.data import DataContext

    from radjepa.locations import filesystem

    block = DataContext.get_current().target_max_block_size  # None: blocks of any size
    rows = blocks = 0
    for shard in shards:
        if rows >= rows_limit and blocks >= blocks_limit:
            break
        fs, path = filesystem(shard)
        meta = pq.read_metadata(path, filesystem=fs)
        rows += meta.num_rows
        if meta.num_rows:  # an empty shard gives an actor nothing
            size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            blocks += 1 if block is None else max(1, -(-size // block))
    return rows, blocks


def _any_rows(shards: list[str]) -> bool:
    """Whether any shard holds a row: footers only, read until the first that does (the first
    shard, unless shards were made by hand)."""
    import pyarrow.parquet as pq

    from radjepa.locations import filesystem

    for shard in shards:
        fs, path = filesystem(shard)
        if pq.read_metadata(path, filesystem=fs).num_rows:
            return True
    return False


def _parquet_files(fs: Any, path: str) -> list[str]:
    import pyarrow.fs as pafs

    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(
        i.path for i in found if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )
