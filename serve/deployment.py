"""Ray Serve wiring: a batched encoder deployment behind a FastAPI ingress deployment.

Thin by design: the encoder deployment wraps :class:`radjepa.inference.EncoderRunner` and adds
``@serve.batch`` (concurrent requests share one forward pass, on GPU when present); the ingress
builds the app from :func:`serve.app.create_app` at replica start and decodes uploads itself,
sending decoded pixel arrays (never UploadFile objects) to the encoder handle.

``build_app(args)`` is the import path that ``serve run``/``serve deploy`` and a KubeRay
RayService use (``serve.deployment:build_app``); ``radjepa serve`` calls the same builder.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serve.embedder import EncoderRunner, ImageEmbedding, ModelInfo, Preprocess, pick_device
from serve.security import ApiSettings, SecurityConfigError, settings_from_config
from serve.startup import replica_startup

__all__ = [
    "EncoderDeployment",
    "ApiIngress",
    "RemoteEmbedder",
    "build_app",
    "app_from_config",
    "check_local_paths",
    "check_pseudonym_key",
    "check_references",
    "check_replica_fits",
    "encoder_queue",
    "ingress_resources",
    "pin_and_check",
]

log = logging.getLogger(__name__)


@serve.deployment(name="RadjepaEncoder")
class EncoderDeployment:
    """The model replica: loads the checkpoint once and runs batched forwards."""

    def __init__(
        self,
        model_ref: str,
        *,
        use_gpu: str = "auto",
        tracking_uri: str | None = None,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01,
        source: str | None = None,
    ) -> None:
        # an error here is said by the driver in one line (serve.startup), not as Ray's traceback
        with replica_startup():
            self._start(model_ref, use_gpu, tracking_uri, source)
        self.embed_batch.set_max_batch_size(max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _start(
        self, model_ref: str, use_gpu: str, tracking_uri: str | None, source: str | None
    ) -> None:
        """``model_ref``: the pinned reference (``app_from_config``); ``source``: what the
        operator asked for (an alias, a run folder), for the log."""
        from serve.registry import resolve_model

        resolved = resolve_model(model_ref, tracking_uri=tracking_uri)
        device = pick_device(use_gpu)
        if device == "cpu":
            # Ray pins actors to OMP_NUM_THREADS=num_cpus (1): a CPU forward would use one core
            # while batching exists precisely to feed a wide forward. Use the node's cores.
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
        self.runner = EncoderRunner.from_checkpoint(
            resolved.path,
            device=device,
            name=resolved.name,
            version=resolved.version,
            source=source or resolved.source,
        )

    def describe(self) -> tuple[ModelInfo, Preprocess]:
        return self.runner.info, self.runner.preprocess

    def fingerprint(self) -> str | None:
        """The served checkpoint's fingerprint (what a probe head records of its encoder)."""
        return self.runner.fingerprint

    def ready(self) -> bool:
        return True

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed_batch(self, items: list[tuple[np.ndarray, bool]]) -> list[ImageEmbedding]:
        images = [img for img, _ in items]
        want = [w for _, w in items]
        # the forward runs in a thread so the replica keeps accepting (and batching) requests
        return await asyncio.to_thread(self.runner.run, images, want)

    async def embed_one(self, image: np.ndarray, want_tokens: bool = False) -> ImageEmbedding:
        return await self.embed_batch((image, want_tokens))


class RemoteEmbedder:
    """The :class:`serve.embedder.Embedder` protocol over an encoder deployment handle.

    Each image is its own batched call, so the files of one multipart request and images from
    concurrent requests all merge into the same forward passes. A request that fails or gives
    up cancels its calls still pending: cancelling the task that awaits a Serve response does
    not cancel the call, which went on holding the encoder for a caller long gone.
    """

    def __init__(self, handle: DeploymentHandle, info: ModelInfo, preprocess: Preprocess) -> None:
        self.handle = handle
        self.info = info
        self.preprocess = preprocess

    async def embed(
        self, images: list[np.ndarray], *, patch_tokens: bool = False
    ) -> list[ImageEmbedding]:
        from ray.serve.exceptions import BackPressureError

        from serve.admission import Overloaded

        calls = [self.handle.embed_one.remote(img, patch_tokens) for img in images]
        # awaited as tasks of our own, to tell which calls are still pending when one fails
        waits = [asyncio.ensure_future(call) for call in calls]
        try:
            return list(await asyncio.gather(*waits))
        except BackPressureError as err:  # the encoder's queue (serve.max_queued_requests x 64)
            _cancel_pending(calls, waits)
            raise Overloaded(f"the encoder is at capacity ({type(err).__name__})") from None
        except BaseException:  # another call failed, or the request's deadline cancelled it
            _cancel_pending(calls, waits)
            raise

    async def ready(self) -> bool:
        return bool(await self.handle.ready.remote())


def _cancel_pending(calls: list[Any], waits: list[asyncio.Future[Any]]) -> None:
    """Cancel each Serve call whose answer has not come: its queued or running forward then
    stops taking the encoder's place (best effort, as Serve's ``cancel`` is). A wait already
    cancelled counts as unanswered: a request cancelled at its deadline has cancelled every
    wait (asyncio.gather does) before this runs, and the calls themselves still run."""
    for call, wait in zip(calls, waits, strict=True):
        if not wait.done() or wait.cancelled():
            call.cancel()
            wait.cancel()


@serve.deployment(name="RadjepaAPI")
@serve.ingress()
class ApiIngress:
    """HTTP ingress: auth, limits and decoding happen here; the forward happens in the encoder."""

    def __init__(
        self,
        encoder: DeploymentHandle,
        settings: dict[str, Any],
        head: str | None = None,
        index: str | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        self._encoder = encoder
        self._settings = ApiSettings.model_validate(settings)
        self._head = head
        self._index = index
        self._tracking_uri = tracking_uri

    async def __serve_build_asgi_app__(self):  # noqa: N807 - Ray Serve's hook name
        # an error here is said by the driver in one line (serve.startup), not as Ray's traceback
        with replica_startup():
            return await self._build_app()

    async def _build_app(self):
        from serve.app import create_app
        from serve.index import EmbeddingIndex

        info, preprocess = await self._encoder.describe.remote()
        head, head_source = None, self._head
        if self._head:
            from serve.registry import resolve_head

            # resolved again here, as the CLI did before deploying (a cluster's replicas may see
            # another store, or a version deleted since): the same resolver, the same message
            served = resolve_head(self._head, tracking_uri=self._tracking_uri)
            head, head_source = served.head, served.source
        index = EmbeddingIndex.from_parquet(self._index) if self._index else None
        # what a head and an index record of their encoder, and the weights' public identity
        fingerprint = await self._encoder.fingerprint.remote()
        return create_app(
            RemoteEmbedder(self._encoder, info, preprocess),
            settings=self._settings,
            head=head,
            index=index,
            head_source=head_source,
            encoder_fingerprint=fingerprint,
            echo_request_id=False,  # the Serve proxy sends X-Request-ID itself
        )


# How often a stopping replica looks whether its requests are done (Ray's default 2 s): each
# replica waited at least that long, one after the other, also when it held no request: 4 s of
# `radjepa serve`'s 7 s to stop on an idle machine. Looking is cheap.
DRAIN_POLL_S = 0.2


def _scaling(cfg_serve: Any) -> dict[str, Any]:
    if cfg_serve.num_replicas == "auto":
        return {
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": cfg_serve.max_replicas,
                "target_ongoing_requests": max(2, cfg_serve.max_batch_size // 2),
            }
        }
    return {"num_replicas": int(cfg_serve.num_replicas)}


def _resolve_gpu(setting: str) -> bool:
    """``serve.use_gpu`` on the Ray in hand (``pipelines.runtime.resolve_use_gpu``): ``true``
    deploys encoder replicas that wait for a GPU node on a cluster (a RayService deploys once
    its head pod is up, often before its GPU workers join: ``auto`` then chose CPU replicas for
    good), and is refused on a local Ray without one (ValueError)."""
    import ray

    from pipelines.runtime import ClusterResourceError, resolve_use_gpu

    if setting == "false" or not ray.is_initialized():
        return setting == "true"
    try:
        return resolve_use_gpu(setting, "serve.use_gpu")
    except ClusterResourceError as err:
        raise ValueError(str(err)) from None


def check_replica_fits(decode_workers: int) -> None:
    """Say before deploying when an API replica cannot be placed: it reserves
    ``decode_workers`` CPUs (:func:`ingress_resources`) and Serve would otherwise wait for a
    node that has them with nothing but its own periodic warnings.

    On a Ray this process started, nothing will add a node: refused (ValueError). On a
    cluster an autoscaler may add a bigger node, so it is a warning there."""
    import ray

    from pipelines.cluster_address import env_names_cluster

    if decode_workers <= 1 or not ray.is_initialized():
        return
    largest = max(
        (float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")),
        default=0.0,
    )
    if decode_workers <= largest:
        return
    what = (
        f"serve.decode_workers={decode_workers}: each API replica reserves that many CPUs, and "
        f"the largest node of this Ray has {largest:g}"
    )
    if not env_names_cluster():
        raise ValueError(f"{what}; lower serve.decode_workers")
    log.warning("%s: the API starts only once the autoscaler adds a node that big", what)


def check_local_paths(model: str | None, head: str | None, index: str | None) -> None:
    """Raise ModelNotFound for a model, head or index given as a local path that does not exist,
    and for an index given as a registry reference or URI: the ingress reads it from its own
    disk (``EmbeddingIndex.from_parquet``), so ``--index models:/...`` or ``s3://...`` failed
    as "index not found: s3:/..." on the driver after Ray started, or in every API replica.

    Needs neither Ray nor MLflow: a typo in a path is one line at once."""
    from serve.registry import ModelNotFound, refuse_run_artifact

    if index is not None and (index.startswith("models:/") or "://" in index):
        raise ModelNotFound(
            f"serve.index must be a folder or Parquet file on this machine, as `radjepa embed` "
            f"writes it; a registry reference or URI is not read: {index}"
        )
    for kind, ref in (("model", model), ("head", head), ("index", index)):
        if ref is None or ref.startswith("models:/") or "://" in ref:
            continue
        refuse_run_artifact(ref)
        if not Path(ref).expanduser().exists():
            raise ModelNotFound(f"serve.{kind} not found: {ref}")


def check_references(
    model: str,
    head: str | None,
    index: str | None,
    tracking_uri: str | None,
    *,
    fetch_model: bool = False,
    before_fetch: Callable[[], None] | None = None,
) -> None:
    """Fail here, in one readable line, for a model, head or index that does not exist, or a
    local head or index made with another encoder: inside a replica the same error becomes
    Ray's retried deployment failure ("Deploying application failed"), three replica
    tracebacks and a driver traceback (an --index typo: ~230 lines and exit 1 after ~60 s).

    Needs no Ray: ``radjepa serve`` calls it before starting Ray (a missing registry version
    was said only after Ray and Serve had started, ~15 s), and ``app_from_config`` for the
    other builders. The model's registry look-up reads metadata only; its weights are read here
    only when they are on this disk already, or with ``fetch_model`` (``radjepa serve`` on the
    local Ray it starts) fetched into ``RADJEPA_CACHE`` first, where that Ray's replicas then
    find them: a version on a tracking server or a checkpoint URI was checked against the head
    and index only by the replicas (~2 minutes and ~220 lines, exit 1). A head is read in full,
    with the resolver the API replicas use (:func:`serve.registry.resolve_head`). Weights
    left to the replicas (a cluster's) are not read: a registered version's
    ``radjepa.encoder_sha256`` tag stands for them when it has one. The replicas still fetch
    and read the weights themselves, bound to the version or checkpoint folder checked here
    (``pinned_reference``): a cluster's replicas fetch into their own caches. ``before_fetch``
    runs once the references are known to exist, before the model's weights are read or
    fetched: ``radjepa serve`` checks its pseudonymisation key there, which was said only
    after a fetch that can take minutes."""
    from serve.index import EmbeddingIndex
    from serve.registry import ModelNotFound, registered_version, resolve_head

    check_local_paths(model, head, index)
    if index:
        # footers only (milliseconds for a million rows): a part cut short was found here only
        # when the model was on this disk, or by check_pseudonym_key on a local Ray
        rows, dim = EmbeddingIndex.check_parts(index)
        if dim:  # what each API replica will hold: said before Ray places them by CPU alone
            log.info(
                "index %s: %d images x %d dims, %.2f GiB of embeddings in each API replica",
                index,
                rows,
                dim,
                rows * dim * 4 / 2**30,
            )
    model_version = None
    if model.startswith("models:/"):
        # a tracking server that does not answer is refused here in seconds (MLflow retried it
        # for minutes, after Ray started): registered_version asks it once first
        model_version = registered_version(model, tracking_uri=tracking_uri)
        # a registered probe head given as the model failed in every encoder replica
        # ("... is not a checkpoint folder (no meta.json)"): ~220 lines and exit 1
        if (model_version.tags or {}).get("radjepa.kind") == "probe-head":
            raise ModelNotFound(
                f"{model} is a probe head (registered by `radjepa probe --register-head`): "
                "give it as --head, and an encoder `radjepa pretrain` registered as --model"
            )
    # read in full with the replicas' own resolver (a head is a few kilobytes): a registered
    # version that is no head, or whose files are gone, was found only by every API replica
    served_head = resolve_head(head, tracking_uri=tracking_uri) if head else None
    if before_fetch is not None:
        before_fetch()
    from radjepa.checkpoint import read_meta
    from radjepa.eval.heads import ENCODER_TAG, check_encoder, checkpoint_fingerprint

    folder = _model_on_this_disk(model, model_version, tracking_uri, fetch=fetch_model)
    if folder is not None:
        read_meta(folder)
    if not (served_head or index):
        return
    if folder is not None:
        fingerprint = checkpoint_fingerprint(folder)
    else:
        # the replicas fetch the weights and check head and index against them; a version
        # `radjepa pretrain` registered records their fingerprint, so a mismatch is said here
        # in one line, not by every replica (~230 lines, exit 1)
        fingerprint = (model_version.tags or {}).get(ENCODER_TAG) if model_version else None
        if not fingerprint:
            return
    if served_head:
        check_encoder(served_head.head, fingerprint)
    if index:
        EmbeddingIndex.check_file(index, fingerprint)


def _model_on_this_disk(
    model: str, version: Any, tracking_uri: str | None, *, fetch: bool = False
) -> Path | None:
    """The checkpoint folder of ``model`` when reading it costs no download: a local folder,
    or a registered version whose files are on this disk (the default sqlite store keeps them
    beside its database, read in place). A version of that store with a head fitted on
    another encoder was refused only by each API replica: ~220 lines and exit 1.

    With ``fetch``, a version on a tracking server or a checkpoint URI too, fetched into the
    cache: only for replicas on this machine, which share the cache (a cluster's replicas
    fetch their own copy, so one here would be a second download of the weights)."""
    from serve.registry import latest_checkpoint, local_source, resolve_model

    if version is not None:
        if not local_source(version.source) and not fetch:
            return None  # a server's or a bucket's copy: the replicas fetch it
        return Path(resolve_model(model, tracking_uri=tracking_uri).path)
    if "://" in model:
        return Path(resolve_model(model).path) if fetch else None
    return Path(latest_checkpoint(str(Path(model).expanduser().resolve())))


def check_pseudonym_key(
    index: str | None, env: str, replica_env: dict[str, str], *, allow_development_key: bool
) -> None:
    """Say on the driver, before anything deploys, what each ingress replica will say at its
    start-up about the key it pseudonymises uploads with: a server key that is not the one the
    index's shards were ingested with leaves ``exclude_same_patient`` unable to find an
    upload's patient by its PatientID (and, for keyed image ids, ``include_self`` unable to
    recognise an archived upload), and the operator of ``radjepa serve`` reads the CLI, not
    replica logs. Refused here: no key at all without ``ingest.allow_development_key``, an
    index recording an unknown patient identity scheme, or several image id schemes (a key that
    is not UTF-8 text, too).

    The key is the one a replica will read, which is not always this process's: a Ray started
    before this process set the variable, or a cluster whose nodes hold it (a Kubernetes
    Secret), gives its workers their own environment. So a zero-CPU task in the replicas'
    runtime env reports its fingerprint (never the key); without Ray, this process's is used:
    ``radjepa serve`` calls it so before starting a local Ray, whose workers inherit this
    process's environment, so that a missing key is said in seconds, not after Ray and Serve.
    """
    server_key = _replica_key_fingerprint(env, replica_env, allow_development_key)
    if not index:
        return
    from serve.index import EmbeddingIndex, upload_image_ids, upload_pseudonyms

    recorded_key, scheme = EmbeddingIndex.recorded_pseudonyms(index)
    id_scheme = EmbeddingIndex.recorded_id_scheme(index)
    if server_key is not None:
        upload_pseudonyms(index, recorded_key, scheme, server_key, env)
        upload_image_ids(index, recorded_key, id_scheme, server_key, env)


def _key_fingerprint_of(env: str, allow_development_key: bool) -> str:
    """The fingerprint of the key this process resolves from ``env`` (run here, or in a
    replica's environment as a Ray task), or ``refused: <why>`` when it has none and the public
    key is not allowed (a string, so that a Ray task returns it rather than a traceback).

    A missing key gets the server's own advice, not ingest's: ingest is told to make a new
    random key, but a server with a new key gives uploads pseudonyms that match none of the
    archive's, so ``exclude_same_patient`` silently excludes nobody."""
    from radjepa.imaging.deid import (
        DevelopmentKeyRefused,
        SecretRefused,
        key_fingerprint,
        resolve_secret,
    )

    try:
        return key_fingerprint(resolve_secret(env, allow_development_key=allow_development_key))
    except DevelopmentKeyRefused:
        return (
            f"refused: {env} is not set: set it to the key the archive was ingested with "
            "(`radjepa ingest` pseudonymised the shards, and so the index, with it; a new key "
            "gives uploads pseudonyms that match none of the index's), or, to try the API "
            "locally without an index, opt in to the PUBLIC development key with "
            "`--set ingest.allow_development_key=true`"
        )
    except SecretRefused as err:
        return f"refused: {err}"


def _replica_key_fingerprint(
    env: str, replica_env: dict[str, str], allow_development_key: bool
) -> str | None:
    """The fingerprint of the pseudonymisation key a replica resolves from ``env``; None when
    the cluster does not answer within a minute (the replicas then still say it).
    SecurityConfigError when the replica would have no key and may not use the public one."""
    import ray

    if not ray.is_initialized():
        found = _key_fingerprint_of(env, allow_development_key)
    else:
        task = ray.remote(num_cpus=0)(_key_fingerprint_of)
        if replica_env:
            task = task.options(runtime_env={"env_vars": replica_env})
        try:
            found = str(ray.get(task.remote(env, allow_development_key), timeout=60))
        except ray.exceptions.GetTimeoutError:
            return None
    if found.startswith("refused: "):
        raise SecurityConfigError(found.removeprefix("refused: "))
    return found


def pin_references(cfg: Any) -> tuple[str, str | None]:
    """The model and head every replica loads whenever it starts (``cfg.serve``'s): an alias
    as its version, a run folder as its newest checkpoint (:func:`serve.registry.
    pinned_reference`). A head folder or URI is read as it is at each replica's start."""
    from pipelines.tracking import store_uri
    from serve.registry import pinned_reference

    sc = cfg.serve
    model = pinned_reference(sc.model, tracking_uri=store_uri(cfg))
    head = sc.head
    if head and head.startswith("models:/"):
        head = pinned_reference(head, tracking_uri=store_uri(cfg))
    for asked, pinned in ((sc.model, model), (sc.head, head)):
        if pinned != asked:
            log.info("serving %s as %s", asked, pinned)
    return model, head


def pin_and_check(
    cfg: Any, *, fetch_model: bool = False, before_fetch: Callable[[], None] | None = None
) -> tuple[str, str | None]:
    """:func:`pin_references`, then :func:`check_references` of what it pinned, which the
    replicas are then bound to. Pinned after the check, an alias promoted or a checkpoint
    written while the check ran (a fetch of the weights takes minutes) bound the replicas to
    other weights than the head and index were checked against."""
    from pipelines.tracking import store_uri

    model, head = pin_references(cfg)
    check_references(
        model,
        head,
        cfg.serve.index,
        store_uri(cfg),
        fetch_model=fetch_model,
        before_fetch=before_fetch,
    )
    return model, head


def app_from_config(
    cfg: Any,
    *,
    settings: ApiSettings | None = None,
    replica_env: dict[str, str] | None = None,
    references_checked: bool = False,
    key_checked: bool = False,
    start_attempts: int | None = None,
    pinned: tuple[str, str | None] | None = None,
) -> Application:
    """Bind the two deployments from a validated Config (``cfg.serve`` says what to serve).

    ``replica_env`` adds env vars to the ingress replicas' runtime env: the demo's public key,
    which its replicas would otherwise lack on a Ray started before the demo set it (Ray keeps
    a runtime env in plain text: never a real secret). ``references_checked``: the caller ran
    :func:`check_references` on this config already (``radjepa serve``, before starting Ray),
    so a local checkpoint is not hashed twice; ``pinned``: what the caller's
    :func:`pin_and_check` gave it (not pinned again, which could name a newer version than
    the one checked). ``key_checked``: the
    caller ran :func:`check_pseudonym_key` for the replicas' environment already (``radjepa
    serve`` on a local Ray, whose replicas have its environment). ``start_attempts``: how many
    replica start-ups of a deployment may fail before Serve gives the deployment up
    (``max_constructor_retry_count``; None: Serve's default, three per replica)."""
    sc = cfg.serve
    if not sc.model:
        raise ValueError(
            "no model to serve: set serve.model (or --model) to a checkpoint "
            "folder or models:/<name>@<alias>"
        )
    from pipelines.tracking import store_uri  # where pretrain registered the models

    if pinned is None:
        pinned = pin_references(cfg) if references_checked else pin_and_check(cfg)
    model, head = pinned
    settings = settings or settings_from_config(
        sc,
        secret_env=cfg.ingest.secret_env,
        allow_development_key=cfg.ingest.allow_development_key,
    )
    replica_env = dict(replica_env or {})
    if not key_checked:
        check_pseudonym_key(
            sc.index,
            settings.secret_env,
            replica_env,
            allow_development_key=settings.allow_development_key,
        )
    check_replica_fits(settings.decode_workers)
    gpu = _resolve_gpu(sc.use_gpu)
    retries = {} if start_attempts is None else {"max_constructor_retry_count": start_attempts}
    encoder = EncoderDeployment.options(
        ray_actor_options={"num_cpus": 1, "num_gpus": 1 if gpu else 0},
        # the encoder must admit a whole batch at once, or @serve.batch never fills
        max_ongoing_requests=max(sc.max_ongoing_requests, 2 * sc.max_batch_size),
        max_queued_requests=encoder_queue(sc.max_queued_requests, settings.max_images_per_request),
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        **retries,
        **_scaling(sc),
    ).bind(
        model,
        use_gpu="true" if gpu else "false",
        tracking_uri=store_uri(cfg),
        source=sc.model,
        max_batch_size=sc.max_batch_size,
        batch_wait_timeout_s=sc.batch_wait_timeout_s,
    )
    ingress_options, replica_settings = ingress_resources(settings, replica_env)
    return ApiIngress.options(
        ray_actor_options=ingress_options,
        max_ongoing_requests=sc.max_ongoing_requests,
        max_queued_requests=sc.max_queued_requests,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        **retries,
        **_scaling(sc),
    ).bind(encoder, replica_settings, head, sc.index, store_uri(cfg))


def encoder_queue(max_queued_requests: int, max_images_per_request: int) -> int:
    """The encoder's ``max_queued_requests``, in images, from ``serve.max_queued_requests``, in
    HTTP requests (-1, unbounded, stays so).

    The API deployment's queue holds requests; the encoder's holds calls, one per image. Given
    the same number, two concurrent requests of 64 images each overflowed a queue of 64 and
    one of them got 503 while the API's own limits had let it in."""
    if max_queued_requests < 0:
        return max_queued_requests
    return max_queued_requests * max_images_per_request


def ingress_resources(
    settings: ApiSettings, replica_env: dict[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Ray actor options, settings) of an API replica: it reserves one CPU per decode thread.

    ``decode_workers: 0`` meant ``os.cpu_count()`` threads inside a replica that reserved one
    CPU: on a 96-core node, 96 concurrent decodes of up to ~1.3 GB each in one replica, beside
    actors Ray had promised those cores. Under Ray Serve 0 now means the CPU the replica
    reserves (one); N reserves N, so Ray places replicas where their threads and memory fit.
    """
    workers = settings.decode_workers or 1
    options: dict[str, Any] = {"num_cpus": workers}
    if replica_env:
        options["runtime_env"] = {"env_vars": replica_env}
    return options, {**settings.model_dump(), "decode_workers": workers}


def build_app(args: dict[str, Any]) -> Application:
    """``serve deploy`` / RayService entry: ``args`` = {config, set, model, head, index,
    api_keys_file} (all optional except a model from args or config).

    Refuses keyless (insecure local) mode: the proxy's host is in the Serve config
    (``http_options``), which this builder never sees, and on a cluster it is 0.0.0.0, where
    every machine reaching the port could call a keyless API. ``radjepa serve
    --insecure-local`` checks its own host and stays the way to run without keys."""
    from radjepa.config import load_config

    direct: dict[str, Any] = {
        f"serve.{key}": args[key]
        for key in ("model", "head", "index", "api_keys_file")
        if args.get(key) is not None
    }
    if args.get("insecure_local"):
        direct["serve.insecure_local"] = True
    cfg = load_config(args.get("config"), list(args.get("set") or []))
    if direct:  # values given as-is (no YAML parsing of paths or models:/ URIs)
        cfg = cfg.with_overrides(direct)
    settings = settings_from_config(
        cfg.serve,
        secret_env=cfg.ingest.secret_env,
        allow_development_key=cfg.ingest.allow_development_key,
    )
    if settings.insecure_local and not settings.key_digests:
        raise SecurityConfigError(
            "serve.deployment:build_app (serve deploy, RayService) refuses insecure local mode "
            "without API keys: it cannot see the host the Serve proxy listens on (0.0.0.0 on a "
            "cluster); configure API keys, or use `radjepa serve --insecure-local` on this machine"
        )
    return app_from_config(cfg, settings=settings)
