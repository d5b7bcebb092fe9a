"""`radjepa demo` end to end on the bundled sample: every stage runs and its summary adds up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_demo_runs_every_stage_and_summarises(tmp_path, ray_session, recwarn):
    from pipelines.demo import SAMPLE, run_demo

    out = tmp_path / "demo"
    summary = run_demo(out, steps=12, sweep_steps=4)

    # ingest: 64 radiographs + 1 truncated file; counts reconcile
    ing = summary["ingest"]
    assert ing["input"] == ing["ok"] + ing["quarantined"] + ing["duplicates"] == 65
    assert ing["ok"] == 64 and ing["quarantined"] == 1
    # pretrain produced a registered checkpoint
    assert summary["pretrain"]["step"] == 12
    assert Path(summary["pretrain"]["checkpoint"], "meta.json").exists()
    assert summary["pretrain"]["model_version"] == "1"
    # the sweep ran both trials and wrote a best config
    assert len(summary["sweep"]["trials"]) == 2
    assert Path(summary["sweep"]["best_config"]).exists()
    # the probe reported ours and both baselines for both labels
    auroc = summary["probe"]["auroc"]
    assert len(auroc) == 3
    assert all(0.0 <= v <= 1.0 for m in auroc.values() for v in m.values() if v is not None)
    # the index holds every image and the API answered each endpoint
    assert summary["index"]["rows"] == 64
    # and no encoder actor was started for nothing: the one shard is one block, which Ray Data
    # gives one actor (two were started, and Ray warned that one could get no input)
    idle = [w for w in recwarn if "minimum number of concurrent actors" in str(w.message)]
    assert not idle, idle[0].message
    calls = summary["api"]["calls"]
    assert calls["healthz"] == 200 and calls["unauthorised"] == 401
    assert calls["readyz"]["ready"] is True and calls["docs"] == 200
    assert {"/v1/embed", "/v1/classify", "/v1/similar"} <= set(calls["openapi_paths"])
    assert calls["embed"]["status"] == 200 and calls["embed"]["dim"] == 192
    assert calls["classify"]["status"] == 200 and len(calls["classify"]["probabilities"]) == 2
    assert calls["similar"]["status"] == 200 and len(calls["similar"]["neighbours"]) == 3
    assert calls["similar"]["excluded_self"] == 1  # the query DICOM is in the demo's archive
    # its patient was found by its archive row and by its PatientID, pseudonymised with the key
    # ingest recorded (the demo serves with the key it ingested with)
    assert calls["similar"]["same_patient"] == {"archive_row": True, "patient_id": "used"}
    # everything is in one folder, and the summary is on disk
    assert json.loads((out / "summary.json").read_text())["total_seconds"] > 0
    assert SAMPLE.is_dir()
    # no fake identifying value from the sample's DICOM tags reached any output file
    markers = [b"FAKE^PATIENT", b"FAKEACC0001", b"FAKE GENERAL HOSPITAL", b"DOE^JANE"]
    for f in (out / "shards").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert not any(m in data for m in markers), f
