"""``radjepa serve``: the same two deployments, started in-process on a local Ray.

Kept apart from the CLI so the foreground loop and the Ray Serve start/stop are plain
functions; ``build_app`` remains the entry point for ``serve deploy`` and RayService.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from radjepa.config import Config
from serve.security import ApiSettings, settings_from_config

__all__ = [
    "STOP_BUDGET_S",
    "PortInUse",
    "check_port_free",
    "start_local",
    "stop_local",
    "curl_example",
]

log = logging.getLogger(__name__)

APP_NAME = "radjepa"


class PortInUse(RuntimeError):
    """The HTTP port is taken: said before Ray starts, in one line."""


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
) -> str:
    """Deploy the API on the connected Ray and return its base URL (port 0 = any free port).

    Raises SecurityConfigError before anything starts when no API key is configured and
    insecure local mode was not asked for, and PortInUse when the port is taken.
    ``replica_env``: env vars for the ingress replicas (``app_from_config``). ``settings``:
    those a caller already built from ``cfg.serve`` (the keys file is then read, and its
    warnings logged, once). ``references_checked``: the caller ran
    ``serve.deployment.check_references`` before starting Ray (``app_from_config``), and
    ``key_checked`` ``serve.deployment.check_pseudonym_key`` for this local Ray.
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
    )
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{cfg.serve.host}:{port}"


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
