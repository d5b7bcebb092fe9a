"""``radjepa demo``: the whole system on the bundled sample, on one laptop, in minutes.

DICOM archive -> Parquet shards -> pretrain -> 2-trial sweep -> probe (with plots and a head)
-> similar-case index -> HTTP API called once per endpoint -> summary. Local Ray, sqlite MLflow,
CPU; everything lands in one output folder. It calls the same functions as the individual
commands, so a newcomer sees exactly what the real jobs do.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from radjepa.config import Config, load_config

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
MARKER = ".radjepa-demo"
DEMO_SECRET = "radjepa-demo-secret-not-for-real-data"


class DemoError(RuntimeError):
    """The demo cannot run here (e.g. the output folder belongs to something else)."""


def demo_config(out: Path, steps: int) -> Config:
    """The tiny CPU config, with every path inside the demo folder."""
    return load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        {
            "train.output_dir": str(out / "runs"),
            "tracking.uri": f"sqlite:///{out / 'runs' / 'mlflow.db'}",
            "train.run_name": "demo",
            "train.steps": steps,
            "train.checkpoint_every": max(1, steps // 3),
            "train.num_workers": 1,
            "data.holdout_fraction": 0.0,
            "probe.bootstrap": 200,
            "probe.folds": 4,
            "serve.port": 0,
            "serve.insecure_local": False,
        },
    )


def _prepare_out(out: Path) -> None:
    """Empty ``out`` for a new demo, refusing anything the demo did not make: a file at (or
    above) ``out`` was a NotADirectoryError traceback, an unwritable one a PermissionError."""
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not (out / MARKER).exists():
                raise DemoError(f"{out} is not an empty folder made by the demo; choose --out")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("made by radjepa demo; safe to delete\n")
    except OSError as err:
        raise DemoError(
            f"cannot use {out} for the demo: {err.strerror or err}; choose --out"
        ) from None


def _call_api(url: str, key: str, sample: Path) -> dict[str, Any]:
    """One request per endpoint, as a client service would make them."""
    import httpx

    dicom = next(iter(sorted((sample / "archive" / "export").glob("0*.dcm"))))
    body = dicom.read_bytes()
    h = {"Authorization": f"Bearer {key}"}
    dcm = {**h, "Content-Type": "application/dicom"}
    calls: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=60) as c:
        calls["healthz"] = c.get("/healthz").status_code
        calls["readyz"] = c.get("/readyz").json()
        spec = c.get("/openapi.json").json()
        calls["openapi_paths"] = sorted(spec["paths"])
        calls["docs"] = c.get("/docs").status_code  # the interactive docs a client team opens
        calls["models"] = c.get("/v1/models", headers=h).json()
        emb = c.post("/v1/embed", content=body, headers=dcm)
        calls["embed"] = {"status": emb.status_code, "dim": emb.json()["results"][0]["dim"]}
        cls = c.post("/v1/classify", content=body, headers=dcm)
        calls["classify"] = {
            "status": cls.status_code,
            "probabilities": cls.json()["results"][0]["probabilities"],
        }
        # other patients' cases: the query (archived by the demo's ingest) and its patient's
        # other images are left out
        sim = c.post(
            "/v1/similar",
            params={"k": 3, "exclude_same_patient": "true"},
            content=body,
            headers=dcm,
        )
        found = sim.json()["results"][0]
        calls["similar"] = {
            "status": sim.status_code,
            "neighbours": [
                {"patient_pid": n["patient_pid"], "score": round(n["score"], 4)}
                for n in found["neighbours"]
            ],
            "excluded_self": found["excluded_self"],
            "excluded_patient": found["excluded_patient"],
            # how the query's patient was found: its archive row, and its PatientID under the
            # key and scheme the index records (the demo serves with its ingest key)
            "same_patient": found["same_patient"],
        }
        calls["unauthorised"] = c.post(
            "/v1/embed", content=body, headers={"Content-Type": "application/dicom"}
        ).status_code
    return calls


def run_demo(
    out: str | os.PathLike[str] = "demo-output",
    *,
    steps: int = 60,
    sweep_steps: int = 20,
    serve_api: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every stage and return (and write ``summary.json``) what each produced."""
    from radjepa.config import ConfigError

    stage = on_stage or (lambda name: log.info("== %s", name))
    root = Path(out).expanduser().resolve()
    try:  # before the folder is emptied: --steps 0 deleted the last demo, then crashed
        demo_config(root, steps)
    except ConfigError as err:
        raise DemoError(f"cannot run the demo with steps={steps}: {err}") from None
    _prepare_out(root)
    api_key = secrets.token_urlsafe(24)
    env = {"RADJEPA_API_KEYS": api_key}
    if not os.environ.get("RADJEPA_DEID_SECRET"):
        env["RADJEPA_DEID_SECRET"] = DEMO_SECRET
    with _scoped_env(env):
        return _run_stages(root, api_key, steps, sweep_steps, serve_api, stage)


@contextmanager
def _scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set env vars for the demo only (Ray workers started inside inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_stages(
    root: Path,
    api_key: str,
    steps: int,
    sweep_steps: int,
    serve_api: bool,
    stage: Callable[[str], None],
) -> dict[str, Any]:
    import ray

    from pipelines.embed import run_embed
    from pipelines.ingest import run_ingest
    from pipelines.pretrain import run_pretrain
    from pipelines.runtime import ensure_ray
    from pipelines.sweep import run_sweep
    from pipelines.tracking import ui_command
    from pipelines.tracking_probe import log_probe_run
    from radjepa.eval.runner import run_probe

    cfg = demo_config(root, steps)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"output": str(root)}

    def timed(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 1)

    started_ray = not ray.is_initialized()
    ensure_ray()
    try:
        stage("ingest: DICOM/PNG archive -> de-identified Parquet shards")
        shards = root / "shards"
        ing = run_ingest([str(SAMPLE / "archive")], str(shards), cfg, progress=False)
        summary["ingest"] = {
            "input": ing.input,
            "ok": ing.ok,
            "quarantined": ing.quarantined,
            "duplicates": ing.duplicates,
            "reasons": ing.reasons,
        }
        timed("ingest")

        stage(f"pretrain: tiny ViT, {steps} steps, Ray Train")
        pre = run_pretrain(cfg, str(shards))
        summary["pretrain"] = {
            "checkpoint": pre.checkpoint,
            "loss": pre.metrics.get("loss"),
            "rankme": pre.metrics.get("rankme"),
            "step": pre.metrics.get("step"),
            "mlflow_run_id": pre.mlflow_run_id,
            "model_version": pre.model_version,
        }
        timed("pretrain")

        stage("sweep: 2 trials over the target-block scale, ranked by RankMe (Ray Tune)")
        sweep_cfg = cfg.with_overrides(
            {
                "train.steps": sweep_steps,
                "train.checkpoint_every": max(1, sweep_steps // 2),
                "tune.name": "demo-sweep",
                "tune.search_alg": "grid",
                "tune.asha": False,
                "tune.search_space": {
                    "masks.target_scale": {"type": "grid", "values": [[0.1, 0.15], [0.15, 0.2]]}
                },
            }
        )
        sw = run_sweep(sweep_cfg, str(shards))
        summary["sweep"] = {
            "trials": [
                {"params": t.params, "rankme": t.metric, "status": t.status} for t in sw.trials
            ],
            "best_config": sw.best_config_path,
        }
        timed("sweep")

        stage("probe: view (AP) and sex (F) from frozen features, with baselines")
        report = run_probe(
            pre.checkpoint, SAMPLE / "labels.csv", ["view=AP", "sex=F"], root / "probe", cfg
        )
        summary["probe"] = _probe_summary(report, root / "probe")
        log_probe_run(report, root / "probe", cfg)
        timed("probe")

        stage("embed: archive index for similar-case search (Ray Data)")
        idx = run_embed(cfg, str(shards), str(root / "index"), model=pre.checkpoint)
        summary["index"] = {"path": str(idx.out), "rows": idx.rows, "dim": idx.dim}
        timed("embed")

        if serve_api:
            stage("serve: Ray Serve + FastAPI; one call per endpoint")
            from serve.local import start_local, stop_local

            serve_cfg = cfg.with_overrides(
                {
                    "serve.model": pre.checkpoint,
                    "serve.head": str(root / "probe" / "head"),
                    "serve.index": str(idx.out),
                }
            )
            # the replicas of a Ray started before the demo set its key lack it: give them
            # the demo's own (public) key; a key of the user's never travels in a runtime env
            demo_key = os.environ.get("RADJEPA_DEID_SECRET") == DEMO_SECRET
            replica_env = {"RADJEPA_DEID_SECRET": DEMO_SECRET} if demo_key else None
            try:  # a start that failed (serve.local.ServeStartFailed) leaves Serve to stop too
                url = start_local(serve_cfg, replica_env=replica_env)
                summary["api"] = {"url": url, "calls": _call_api(url, api_key, SAMPLE)}
            finally:
                stop_local()
            timed("serve")
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    summary["seconds"] = timings
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    summary["mlflow_ui"] = ui_command(cfg.tracking.uri or "")
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _probe_summary(report: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The headline numbers: AUROC per label for ours and both baselines."""
    out: dict[str, Any] = {"report": str(folder / "report.md"), "auroc": {}}
    for method, res in (report.get("methods") or {}).items():
        out["auroc"][method] = {
            lab["name"]: (lab.get("auroc") or {}).get("estimate") for lab in res.get("labels", [])
        }
    return out
