"""The copies of a finished run that test_pretrain.py's re-run tests start from: a copy's MLflow
store resolves into the copy, under a run id of its own, and using it leaves the original as it
was (the next test copies it again)."""

from __future__ import annotations

import json
from pathlib import Path

from run_copies import copy_run, moved


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_copy_s_store_is_its_own(tmp_path, migrated_store):
    import dataclasses

    import mlflow

    src, dst = tmp_path / "first", tmp_path / "copy"
    (src / "t").mkdir(parents=True)
    dst.mkdir()
    uri = migrated_store(src / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("radjepa", artifact_location=(src / "mlartifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    (src / "t" / "mlflow_run_id").write_text(run_id)
    (src / "t" / "meta.json").write_text(json.dumps({"dir": str(src / "t")}))
    (src / "w.txt").write_text("weights")
    client.log_artifact(run_id, str(src / "w.txt"), "checkpoint-step-2")
    client.create_registered_model("m")
    source = f"{client.get_run(run_id).info.artifact_uri}/checkpoint-step-2"
    client.create_model_version("m", source, run_id)
    client.set_terminated(run_id)
    before = _snapshot(src)

    @dataclasses.dataclass(frozen=True)
    class Result:
        run_dir: str
        mlflow_run_id: str
        step: int

    changes = copy_run(src, dst)
    copied = moved(Result(str(src / "t"), run_id, 2), changes)
    assert copied.run_dir == str(dst / "t") and copied.step == 2
    assert copied.mlflow_run_id != run_id
    assert (dst / "t" / "mlflow_run_id").read_text() == copied.mlflow_run_id
    assert json.loads((dst / "t" / "meta.json").read_text()) == {"dir": str(dst / "t")}

    mine = mlflow.MlflowClient(f"sqlite:///{dst / 'mlflow.db'}")
    run = mine.get_run(copied.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((dst / "mlartifacts").as_uri() + "/")
    got = mine.download_artifacts(copied.mlflow_run_id, "checkpoint-step-2", str(tmp_path / "dl"))
    assert (Path(got) / "w.txt").read_text() == "weights"
    (version,) = mine.search_model_versions("name='m'")
    assert version.run_id == copied.mlflow_run_id
    assert version.source.startswith((dst / "mlartifacts").as_uri() + "/")
    # what the copy logs lands in the copy (MLflow caches artifact stores by run id alone)
    mine.log_artifact(copied.mlflow_run_id, str(src / "w.txt"), "more")
    assert [a.path for a in mine.list_artifacts(copied.mlflow_run_id, "more")] == ["more/w.txt"]
    assert _snapshot(src) == before
    files = {name: data for name, data in _snapshot(dst).items() if not name.endswith(".db")}
    assert not any(str(src).encode() in data or run_id.encode() in data for data in files.values())
