"""Shared fixtures: one local Ray instance per test session, real sample data, GPU marker."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from signal_state import WATCHED, dispositions

REPO = Path(__file__).resolve().parents[1]

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): a run's
# end is seen two polls after its loop returns (fit() returned 4.1 s after it, 0.5 s at 0.2 s,
# measured on the 2-core CI box), and a worker's second report waits for the poll that takes the
# first. Every Train run here pays that, the sweeps' trials and the CLIs this session starts
# included (they inherit this environment). Tests only: a missed poll is no error until
# RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min), and products keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
NIH_DIR = REPO.parent / "shared" / "data" / "nih-cxr14-621"
BUNDLED_SAMPLE = REPO / "data" / "sample"


def pytest_report_header(config: pytest.Config) -> str | None:
    """Say when this pytest started with SIGINT ignored: a shell's background job (``pytest
    &`` in a CI script) gets it so, every child inherits it, and a child Python then never
    raises KeyboardInterrupt (the serve CLI tests start theirs with SIGINT at its default).
    The autouse fixture below only sees what a test changes."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return "SIGINT is ignored in this pytest process from its start (a background job?)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def signal_dispositions_unchanged():
    """Fail a test that leaves this process's SIGINT, SIGTERM or SIGUSR1 disposition changed
    (``signal_state.WATCHED``). A library entry point that did so took Ctrl-C away from an
    in-process caller (a notebook, a service), and from every later test here: one CI run's
    pytest had SIGINT ignored by the time the serve tests ran, and a child it started
    inherited that and never stopped. A test that changes a handler on purpose puts it back
    before it ends."""
    handlers = {sig: signal.getsignal(sig) for sig in WATCHED}
    before = dispositions()
    yield
    after = dispositions()
    if after != before or any(signal.getsignal(s) != h for s, h in handlers.items()):
        said = "; ".join(f"{sig.name} {before[sig]} -> {after[sig]}" for sig in WATCHED)
        # put them back, so that the tests after this one do not fail for it
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        pytest.fail(f"the test left signal dispositions changed: {said}", pytrace=False)


@pytest.fixture
def one_torch_thread():
    """Tiny models run faster (and less noisily beside Ray workers) on one intra-op thread."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def nih_dir() -> Path:
    """The 621-image NIH ChestX-ray14 sample shipped beside the checkout (read-only)."""
    if not (NIH_DIR / "labels.csv").exists():
        pytest.skip(f"NIH sample not found at {NIH_DIR}")
    return NIH_DIR


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: bounded object store, no dashboard, and more
    logical CPUs than cores so Ray Data is not starved by Train workers on a 2-core box."""
    import ray

    from pipelines.runtime import LOCAL_RUNTIME_ENV

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        ray.init(
            address="local",  # never a cluster a `ray start` on this machine left behind
            num_cpus=8,
            num_gpus=0,
            object_store_memory=512 * 1024**2,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            runtime_env=LOCAL_RUNTIME_ENV,  # as `radjepa` starts its local instance
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def nih_shards(tmp_path_factory, ray_session, nih_dir) -> Path:
    """80 real NIH radiographs ingested once by the real ingest job (shared by the Ray tests)."""
    import shutil

    from pipelines.ingest import run_ingest
    from radjepa.config import load_config

    src = tmp_path_factory.mktemp("archive")
    for p in sorted((nih_dir / "images").glob("*.png"))[:80]:
        shutil.copy(p, src / p.name)
    dst = tmp_path_factory.mktemp("shards")
    run_ingest(
        [str(src)], str(dst), load_config(REPO / "configs" / "tiny_cpu.yaml"), progress=False
    )
    return dst


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An MLflow sqlite store migrated once per session, for ``mlflow_stores.place_store``."""
    from mlflow_stores import build_template

    return build_template(tmp_path_factory.mktemp("mlflow-template"))


@pytest.fixture
def migrated_store(mlflow_template) -> Callable[[Path], str]:
    """``migrated_store(db)`` puts an MLflow sqlite store, schema built, at ``db`` and returns
    its URI: what a test's first open would have made, without the 2-3 s of migrations each
    (``mlflow_stores``). For a test that needs a store, not one about creating it."""
    from mlflow_stores import place_store

    return lambda db: place_store(mlflow_template, db)


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (a disk that fills up at the first checkpoint file), unmounted after;
    skipped where mounting is not allowed (it needs root in a privileged container)."""
    from small_disks import tmpfs

    with tmpfs(tmp_path / "small-disk", "1m") as disk:
        yield disk


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on loopback, proxying artifacts (``mlflow-artifacts:``), as a
    cluster's tracking server does."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    from serve_helpers import free_port

    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe) if exe.exists() else shutil.which("mlflow") or "mlflow", "server"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
    cmd += ["--artifacts-destination", str(tmp_path / "server-artifacts")]
    # MLflow 3's server starts 8 job-queue consumers (its GenAI jobs, which no test uses):
    # 16 s of CPU and 10 processes by /health, against 5 s and 2 without (the 2-core CI box)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
