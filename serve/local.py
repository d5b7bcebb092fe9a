"""``radjepa serve``: the same two deployments, started in-process on a local Ray.

Kept apart from the CLI so the foreground loop and the Ray Serve start/stop are plain
functions; ``build_app`` remains the entry point for ``serve deploy`` and RayService.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from radjepa.config import Config
from radjepa.log_filters import lines_dropped
from serve.security import ApiSettings, settings_from_config

__all__ = [
    "STOP_BUDGET_S",
    "PortInUse",
    "ServeStartFailed",
    "check_port_free",
    "start_failures_said_once",
    "start_local",
    "stop_local",
    "curl_example",
]

log = logging.getLogger(__name__)

APP_NAME = "radjepa"


class PortInUse(RuntimeError):
    """The HTTP port is taken: said before Ray starts, in one line."""


class ServeStartFailed(RuntimeError):
    """A deployment's replicas could not start (found only there: an index whose pages are
    damaged, a model the replicas cannot fetch or read); the message is one line naming the
    deployment and the replica's own error."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """Raise PortInUse when ``host:port`` cannot be bound (0 = any free port: always fine).

    Without this, Ray Serve's proxy fails to bind inside its actor, retries, and the user gets
    about 150 lines of proxy tracebacks and exit code 1 some 50 s later. The probe binds as the
    proxy does (same address family, no SO_REUSEADDR), so it refuses exactly what the proxy
    would refuse.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise PortInUse(
                f"cannot listen on {host}:{port}: {err.strerror or err}; stop what holds the "
                "port or choose another with --port (0: any free port)"
            ) from None


def start_local(
    cfg: Config,
    *,
    replica_env: dict[str, str] | None = None,
    settings: ApiSettings | None = None,
    references_checked: bool = False,
    key_checked: bool = False,
    start_attempts: int | None = None,
) -> str:
    """Deploy the API on the connected Ray and return its base URL (port 0 = any free port).

    Raises SecurityConfigError before anything starts when no API key is configured and
    insecure local mode was not asked for, and PortInUse when the port is taken.
    ``replica_env``: env vars for the ingress replicas (``app_from_config``). ``settings``:
    those a caller already built from ``cfg.serve`` (the keys file is then read, and its
    warnings logged, once). ``references_checked``: the caller ran
    ``serve.deployment.check_references`` before starting Ray (``app_from_config``), and
    ``key_checked`` ``serve.deployment.check_pseudonym_key`` for this local Ray.
    ``start_attempts``: replica start-ups a deployment may fail before Serve gives it up
    (``app_from_config``). Raises ServeStartFailed when a deployment's replicas do not start.
    """
    from ray import serve

    from serve.deployment import app_from_config

    settings = settings or settings_from_config(
        cfg.serve,
        secret_env=cfg.ingest.secret_env,
        allow_development_key=cfg.ingest.allow_development_key,
    )
    check_port_free(cfg.serve.host, cfg.serve.port)
    port = cfg.serve.port or _free_port(cfg.serve.host)
    serve.start(
        http_options={
            "host": cfg.serve.host,
            "port": port,
            "request_timeout_s": cfg.serve.request_timeout_s + 5.0,
        }
    )
    app = app_from_config(
        cfg,
        settings=settings,
        replica_env=replica_env,
        references_checked=references_checked,
        key_checked=key_checked,
        start_attempts=start_attempts,
    )
    try:
        # serve.run connects to the instance serve.start just made with these http_options and
        # says that "new http_options ... will not be applied": there are none; dropped
        with lines_dropped("ray.serve", "Connecting to existing Serve app"):
            serve.run(app, name=APP_NAME, route_prefix="/")
    except RuntimeError as err:  # "Deploying application radjepa failed: ..." (no cause named)
        raise ServeStartFailed(_failed_start(err)) from None
    return f"http://{cfg.serve.host}:{port}"


def _failed_start(err: RuntimeError) -> str:
    """One line for a deployment that did not start: which deployment, and its replica's own
    error (:mod:`serve.startup`), read from Serve's status of the application. The whole
    status message (the replica's traceback) is logged at DEBUG; the Serve controller's log
    (``logs/serve/controller_*.log`` in the Ray session folder) holds it too."""
    from ray import serve

    from serve.startup import startup_message

    said = (str(err).strip().splitlines() or [""])[0].strip() or type(err).__name__
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception as status_err:  # noqa: BLE001 - Ray's own words are the fallback
        log.debug("Serve's status could not be read: %r", status_err)
        return said
    if app is None:
        return said
    failed = []
    for name, deployment in app.deployments.items():
        if str(deployment.status).rsplit(".", 1)[-1] not in ("DEPLOY_FAILED", "UNHEALTHY"):
            continue
        log.debug("deployment %s: %s", name, deployment.message)
        own = startup_message(deployment.message)
        if own is None:  # not our replicas' error (killed, out of memory, Serve's own)
            lines = [x.strip() for x in (deployment.message or "").splitlines() if x.strip()]
            own = lines[-1][:500] if lines else "no reason given"
        failed.append(f"the {name} deployment failed to start: {own}")
    return "; ".join(failed) or said


# "(ServeController pid=123) ERROR 2026-12-05 14:25:53,908 controller 123 -- ...": one log
# record of the controller forwarded to this process's stderr, each line so prefixed
_FORWARDED = re.compile(r"^\(ServeController pid=\d+(?:, ip=[^)]*)?\) ?(.*)$")
_RECORD = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{4}-\d\d-\d\d ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _WithoutStartTracebacks:
    """A text stream passing everything on but the Serve controller's records of a replica
    that failed to start ("Exception in Replica(...)" and the traceback under it, forwarded
    line by line to the driver's stderr): the driver says each failure in one line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.active = True
        self._partial = ""
        self._hiding = False

    def write(self, text: str) -> int:
        if not self.active and not self._partial:  # the application runs: as it comes
            return self.stream.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if self._keep(line):
                self.stream.write(line + "\n")
        return len(text)

    def _keep(self, line: str) -> bool:
        forwarded = _FORWARDED.match(_ANSI.sub("", line))
        if not self.active or forwarded is None:
            return True
        body = forwarded.group(1)
        if _RECORD.match(body):  # a new record: the end of the one hidden
            self._hiding = "Exception in Replica(" in body
        return not self._hiding

    def flush(self) -> None:
        if self._partial:
            self.stream.write(self._partial)
            self._partial = ""
        self.stream.flush()

    def __getattr__(self, name: str):  # encoding, isatty, fileno, ...
        return getattr(self.stream, name)


@contextmanager
def start_failures_said_once() -> Iterator[_WithoutStartTracebacks]:
    """While inside, the Serve controller's traceback of each replica that fails to start is
    kept off this process's stderr (Ray forwards it there: ~50 lines a replica, ~230 in all);
    ServeStartFailed says the failure in one line instead. The traceback stays in the
    controller's log. Set ``.active = False`` once the application runs: a replica failing
    later (a new one the autoscaler adds) is then said by the controller as before. Lines
    forwarded after the failure, while Ray stops, are still filtered, hence a context
    spanning the stop rather than ``serve.run`` alone."""
    stream = _WithoutStartTracebacks(sys.stderr)
    sys.stderr = stream  # type: ignore[assignment]
    try:
        yield stream
    finally:
        if sys.stderr is stream:
            sys.stderr = stream.stream
        stream.flush()


# `radjepa serve` stops within STOP_BUDGET_S of Ctrl-C or SIGTERM, under a Kubernetes pod's
# default 30 s grace (its SIGKILL came mid-shutdown): Serve gets SERVE_STOP_TIMEOUT_S, Ray's
# own stop of the local instance the rest (SIGTERM, then SIGKILL after 1 s, per process;
# 2-3 s measured on a loaded 2-core box). Left to itself serve.shutdown waits 5 s for the
# controller to answer, then 30 s for its graceful shutdown, which waits up to each replica's
# graceful_shutdown_timeout_s (20 s) for requests whose callers the proxies it killed first
# have already cut off: 42 s from Ctrl-C to exit on the loaded box.
STOP_BUDGET_S = 20.0
SERVE_STOP_TIMEOUT_S = 10.0


def stop_local(timeout_s: float = SERVE_STOP_TIMEOUT_S) -> bool:
    """Shut Ray Serve down, waiting ``timeout_s`` at most; returns whether it finished.

    Past the wait the controller goes on shutting the application down by itself (it was told
    to first), and a local Ray's ``ray.shutdown`` then stops whatever is left. Serve's async
    shutdown is awaited so the wait can be cut: abandoning the blocking one in a thread would
    leave that thread inside Ray's core worker while ray.shutdown destroys it.

    Never raises an error (an interruption still goes through): the caller's stop goes on to
    Ray's shutdown and its last line whatever Serve's meets. An error here skipped
    ``radjepa serve``'s ``stopped`` and ended it in a traceback; it is said in one line.

    Never starts anything: with Ray down in this process (``ray.shutdown`` already ran, or Ray
    was never started) there is nothing it can stop, and it returns True. Serve's shutdown
    calls ``ray.init`` when Ray is not initialised: a stop then started a local Ray instance
    of Ray's defaults (a dashboard, every core; 40 s on a loaded box), or joined the cluster a
    ``ray start`` on this machine had left, to find no Serve there.
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        log.info("Ray is not running in this process: no Ray Serve to shut down")
        return True

    async def bounded() -> None:
        await asyncio.wait_for(serve.shutdown_async(), timeout_s)

    shutdown = bounded()
    try:
        asyncio.run(shutdown)
    except TimeoutError:
        log.warning("Ray Serve did not shut down within %g s; stopping it with Ray", timeout_s)
        return False
    except Exception as err:  # noqa: BLE001 - a stop: Ray's shutdown ends what is left
        shutdown.close()  # not started when asyncio.run refused it: no "never awaited" warning
        said = (str(err).strip().splitlines() or [""])[0].strip()
        log.warning(
            "Ray Serve's shutdown failed (%s%s); stopping it with Ray",
            type(err).__name__,
            f": {said}" if said else "",
        )
        return False
    return True


def curl_example(url: str, *, with_key: bool) -> str:
    auth = '-H "Authorization: Bearer ${RADJEPA_API_KEYS%%,*}" ' if with_key else ""
    return (
        f"curl -s {auth}-H 'Content-Type: application/dicom' "
        f"--data-binary @image.dcm {url}/v1/embed"
    )
