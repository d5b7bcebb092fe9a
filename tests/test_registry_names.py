"""Registered model names and versions against a real MLflow registry on sqlite: a name is
checked when it is read (not refused by MLflow after the training or the probe), one MLflow
takes is found again by serve, a registered version's files never change, and a probe whose
record fails says so in one line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from serve_helpers import REPO, TINY_CONFIG, make_checkpoint

from radjepa.config import ConfigError, check_registry_name, load_config

# refused by MLflow when the version is registered ('/' and ':' too), or unusable after
REFUSED = ["enc/v1", "enc:v1", "enc@prod", ".", "..", "..enc", "a'b\"c", "x" * 257, " "]
TAKEN = ["radjepa-encoder", "bob's-head", 'the "big" one', ".enc", "enc.", "a b", "é", "x" * 256]


@pytest.mark.parametrize("name", REFUSED)
def test_a_registry_name_the_registry_or_a_reference_cannot_hold_is_refused_with_the_config(
    name,
):
    with pytest.raises(ConfigError, match="tracking.registered_model"):
        load_config(TINY_CONFIG, [f"tracking.registered_model={name}"])


def test_every_name_mlflow_refuses_is_refused_and_the_names_taken_register(
    tmp_path, migrated_store
):
    # MLflow's own check, run when a version is registered: nothing it refuses gets past the
    # config, and each name the config takes registers and is found again by serve
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    from pipelines.tracking import client, ensure_experiment, register_artifact_dir
    from serve.registry import registered_version

    for name in REFUSED:
        with pytest.raises(ValueError):
            check_registry_name(name)
    for name in ["enc/v1", "enc:v1", ".", "..", "..enc", " "]:
        with pytest.raises(MlflowException):
            _validate_model_name(name)
    uri = migrated_store(tmp_path / "mlflow.db")
    exp = ensure_experiment(uri, "names", str(tmp_path))
    run = client(uri).create_run(exp).info.run_id
    ckpt = make_checkpoint(tmp_path / "ckpt")
    client(uri).log_artifacts(run, str(ckpt), "checkpoint-step-7")
    for name in TAKEN:
        assert check_registry_name(name) == name
        _validate_model_name(name)
        version = register_artifact_dir(uri, run, "checkpoint-step-7", name)
        for ref in (f"models:/{name}/latest", f"models:/{name}", f"models:/{name}/{version}"):
            assert str(registered_version(ref, tracking_uri=uri).version) == version, ref


def _retrained_at_step_7(tmp_path: Path) -> tuple[Path, Path]:
    """Two checkpoints of step 7 with other weights: a run retrained from an earlier one."""
    import torch

    torch.manual_seed(0)
    first = make_checkpoint(tmp_path / "a", step=7)
    torch.manual_seed(1)
    return first, make_checkpoint(tmp_path / "b", step=7)


def test_a_second_checkpoint_at_a_registered_step_becomes_a_new_version_beside_it(
    tmp_path, migrated_store
):
    # the registered version's folder was written again with the other weights: a replica that
    # fetched it afresh served them, one with a cached copy the old ones, under one version
    import torch

    from pipelines.pretrain_tracking import finish_tracking
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import ensure_experiment
    from radjepa.eval.heads import ENCODER_TAG, checkpoint_fingerprint

    uri = migrated_store(tmp_path / "mlflow.db")
    client = tracking_client(uri)
    cfg = load_config(TINY_CONFIG, ["tracking.registered_model=enc", "train.run_name=r"])
    run = client.create_run(ensure_experiment(uri, "rewrite", str(tmp_path))).info.run_id
    first, second = _retrained_at_step_7(tmp_path)

    def files(version: str) -> tuple[Path, str]:
        """A version's folder and the sha256 of the weights in it."""
        source = Path(client.get_model_version("enc", version).source.removeprefix("file://"))
        return source, hashlib.sha256((source / "weights.safetensors").read_bytes()).hexdigest()

    assert finish_tracking(cfg, uri, run, str(first), {}) == "1"
    client.set_registered_model_alias("enc", "champion", "1")
    folder, digest = files("1")
    assert folder.name == "checkpoint-step-7"
    assert finish_tracking(cfg, uri, run, str(second), {}) == "2"
    assert files("1")[1] == digest  # @champion's files as they were
    other, other_digest = files("2")
    want = hashlib.sha256((second / "weights.safetensors").read_bytes()).hexdigest()
    assert other != folder and other_digest == want
    assert other.name == f"checkpoint-step-7-{checkpoint_fingerprint(second)[:12]}"
    tags = client.get_model_version("enc", "2").tags
    assert tags[ENCODER_TAG] == checkpoint_fingerprint(second) and tags["step"] == "7"
    # a re-run of either finished run adds no version and writes no file
    before = {p: p.stat().st_mtime_ns for p in (*folder.iterdir(), *other.iterdir())}
    assert finish_tracking(cfg, uri, run, str(first), {}) == "1"
    assert finish_tracking(cfg, uri, run, str(second), {}) == "2"
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert len(client.search_model_versions("name='enc'")) == 2
    # not registering: the weights still go beside a version's folder, never into it
    unregistered = load_config(TINY_CONFIG, ["tracking.register_model=false"])
    torch.manual_seed(2)
    third = make_checkpoint(tmp_path / "c", step=7)
    assert finish_tracking(unregistered, uri, run, str(third), {}) is None
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert files("1")[1] == digest
    assert str(client.get_model_version_by_alias("enc", "champion").version) == "1"
    beside = f"checkpoint-step-7-{checkpoint_fingerprint(third)[:12]}"
    assert beside in {a.path for a in client.list_artifacts(run)}


def test_a_run_that_registers_nothing_writes_no_folder_of_it_again(tmp_path, migrated_store):
    # the folder was chosen by the registry's versions: a run that registered nothing wrote its
    # checkpoint-step-N again with retrained weights, which a version registered from it by
    # hand (a runs:/ URI) had as its files; and the registry was asked though never used

    from pipelines.pretrain_tracking import finish_tracking
    from pipelines.tracking import client as tracking_client
    from pipelines.tracking import ensure_experiment
    from radjepa.eval.heads import checkpoint_fingerprint

    uri = migrated_store(tmp_path / "mlflow.db")
    client = tracking_client(uri)
    cfg = load_config(TINY_CONFIG, ["tracking.register_model=false", "train.run_name=r"])
    run = client.create_run(ensure_experiment(uri, "unregistered", str(tmp_path))).info.run_id
    first, second = _retrained_at_step_7(tmp_path)
    assert finish_tracking(cfg, uri, run, str(first), {}) is None
    folder = Path(client.get_run(run).info.artifact_uri.removeprefix("file://"))
    plain = folder / "checkpoint-step-7" / "weights.safetensors"
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()
    assert finish_tracking(cfg, uri, run, str(second), {}) is None
    assert hashlib.sha256(plain.read_bytes()).hexdigest() == digest
    own = folder / f"checkpoint-step-7-{checkpoint_fingerprint(second)[:12]}"
    assert (own / "weights.safetensors").read_bytes() == (
        second / "weights.safetensors"
    ).read_bytes()
    # a re-run of either finished run writes nothing (a second copy of its weights was
    # uploaded beside the first)
    before = {p: p.stat().st_mtime_ns for p in (*plain.parent.iterdir(), *own.iterdir())}
    assert finish_tracking(cfg, uri, run, str(second), {}) is None
    assert finish_tracking(cfg, uri, run, str(first), {}) is None
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert len([a for a in client.list_artifacts(run) if a.is_dir]) == 2
    # a folder uploaded before the tag existed: its own files say it holds these weights
    client.delete_tag(run, "radjepa.folder_encoder.checkpoint-step-7")
    assert finish_tracking(cfg, uri, run, str(first), {}) is None
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert len([a for a in client.list_artifacts(run) if a.is_dir]) == 2
    # a folder cut short (its upload stopped before meta.json, so untagged) is not taken as
    # holding them
    third = make_checkpoint(tmp_path / "c", step=9)
    client.log_artifact(run, str(third / "weights.safetensors"), "checkpoint-step-9")
    assert finish_tracking(cfg, uri, run, str(third), {}) is None
    beside = folder / f"checkpoint-step-9-{checkpoint_fingerprint(third)[:12]}"
    assert sorted(p.name for p in beside.iterdir()) == ["meta.json", "weights.safetensors"]


@pytest.fixture(scope="module")
def probe_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny JEPA saved with the core's own checkpoint writer."""
    from radjepa.checkpoint import save_checkpoint
    from radjepa.engine import Pretrainer

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["model.depth=2", "train.seed=1"])
    folder = tmp_path_factory.mktemp("ckpt") / "step-0"
    save_checkpoint(folder, Pretrainer(cfg, "cpu"))
    return folder


def _probe_sex(ckpt: Path, nih_dir: Path, out: Path, runs: Path, **options: str) -> None:
    """The CLI's probe of the sample's sex label with a head registered, tracked under
    ``runs``: small and fast (20 images, no bootstrap)."""
    from pipelines.cli_probe import probe_cmd

    probe_cmd(
        str(ckpt),
        ["sex=F"],
        str(out),
        csv=str(nih_dir / "labels.csv"),
        limit=20,
        set_=[f"train.output_dir={runs}", "probe.bootstrap=0"],
        register_head=True,
        **options,
    )


@pytest.mark.parametrize("name", ["bad/name", "enc@prod", "..enc"])
def test_probe_refuses_a_head_name_before_the_probe(
    name, tmp_path, probe_checkpoint, nih_dir, monkeypatch
):
    # MLflow refused it only when the head was registered, after the whole probe, in a
    # 58-line traceback
    from pipelines.cli import UserError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "probe"
    with pytest.raises(UserError, match="--head-name: .*registered model name"):
        _probe_sex(probe_checkpoint, nih_dir, out, tmp_path / "runs", head_name=name)
    assert not (out / "report.json").exists()
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_a_store_failing_after_the_probe_is_one_line_naming_the_results(
    tmp_path, probe_checkpoint, nih_dir, monkeypatch, migrated_store
):
    # the experiment's artifact root cannot be written (a regular file where its folder
    # goes): the store fails when the report is uploaded, after the probe's work
    from pipelines.cli import RunFailed
    from pipelines.tracking import client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    uri = migrated_store(runs / "mlflow.db")
    (tmp_path / "blocker").write_text("")
    exp = client(uri).create_experiment(
        "radjepa", artifact_location=(tmp_path / "blocker" / "artifacts").as_uri()
    )
    out = tmp_path / "probe"
    with pytest.raises(RunFailed) as raised:
        _probe_sex(probe_checkpoint, nih_dir, out, runs)
    said = str(raised.value)
    assert said.startswith("cannot record the probe in MLflow: ") and "\n" not in said
    assert said.endswith(f"the report and head are in {out.resolve()}")
    assert (out / "report.json").is_file() and (out / "head" / "head.json").is_file()
    (run,) = client(uri).search_runs([exp])
    assert run.info.status == "FAILED"


def test_a_checkpoint_saved_under_a_name_the_registry_refuses_still_loads(tmp_path):
    # the stricter name check ran in the schema, so the config saved in a checkpoint trained
    # under an earlier version ('@' in the name, register_model=false with '..x') no longer
    # validated: probe, embed, serve and resume all refused the checkpoint as of another version
    import json

    from radjepa.checkpoint import saved_config

    for name in ("team@radjepa-encoder", "..radjepa", "x" * 300):
        unregistered = load_config(
            TINY_CONFIG,
            [f"tracking.registered_model={name}", "tracking.register_model=false"],
        )
        assert unregistered.tracking.registered_model == name
        ckpt = make_checkpoint(tmp_path / f"ckpt-{len(name)}-{name[:2]}")
        meta = ckpt / "meta.json"
        data = json.loads(meta.read_text())
        data["config"]["tracking"]["registered_model"] = name
        meta.write_text(json.dumps(data))
        assert saved_config(ckpt).tracking.registered_model == name
