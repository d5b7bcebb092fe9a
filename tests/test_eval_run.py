"""End to end on the real NIH sample: `run_probe` and the `radjepa probe` CLI with MLflow sqlite."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = ["view=AP", "sex=F"]


@pytest.fixture(scope="module")
def tiny_cfg():
    from radjepa.config import load_config

    # train.seed != probe.seed: the untrained checkpoint must not equal the baseline's init
    overrides = ["model.depth=2", "probe.bootstrap=200", "train.seed=1"]
    return load_config(REPO / "configs" / "tiny_cpu.yaml", overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_cfg) -> Path:
    """A randomly initialised tiny JEPA saved with the core's own checkpoint writer."""
    from radjepa.checkpoint import save_checkpoint
    from radjepa.engine import Pretrainer

    folder = tmp_path_factory.mktemp("ckpt") / "step-0"
    save_checkpoint(folder, Pretrainer(tiny_cfg, "cpu"))
    return folder


@pytest.fixture(scope="module")
def seg_csv(tmp_path_factory) -> Path:
    """16 synthetic radiograph-sized PNGs with one bright disc each, and their mask PNGs."""
    from PIL import Image
    from test_eval_features import _disc_pairs

    folder = tmp_path_factory.mktemp("seg")
    images, masks = _disc_pairs(16, size=256, seed=3)
    lines = ["image,disc"]
    for i, (img, m) in enumerate(zip(images, masks, strict=True)):
        Image.fromarray(img).save(folder / f"img{i}.png")
        Image.fromarray(m.astype(np.uint8) * 255).save(folder / f"mask{i}.png")
        lines.append(f"img{i}.png,mask{i}.png")
    (folder / "masks.csv").write_text("\n".join(lines) + "\n")
    return folder / "masks.csv"


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, checkpoint, tiny_cfg, nih_dir, seg_csv):
    from radjepa.eval.runner import run_probe

    out = tmp_path_factory.mktemp("probe")
    said: list[str] = []  # what the probe logged (caplog is per test)
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("radjepa")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        report = run_probe(
            checkpoint,
            nih_dir / "labels.csv",
            LABELS,
            out,
            tiny_cfg,
            limit=160,
            seg_csv=seg_csv,
            structures=["disc"],
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return report, out, said


def _inside(iv: dict) -> bool:
    return iv["low"] <= iv["estimate"] <= iv["high"]


def test_probe_reports_view_and_sex_for_encoder_and_both_baselines(probe_run):
    report, out, said = probe_run
    assert set(report["methods"]) == {"ours", "random_init", "pixels"}
    assert report["data"]["n_images"] == 160 and report["data"]["n_patients"] == 160
    assert [lab["positive"] for lab in report["data"]["labels"]] == ["AP", "F"]
    assert report["data"]["labels"][0]["n_pos"] == 32
    for method, res in report["methods"].items():
        assert [lab["name"] for lab in res["labels"]] == LABELS
        for lab in res["labels"]:
            assert lab["skipped"] is None and lab["folds"] == 5
            for metric in ("auroc", "auprc"):
                iv = lab[metric]
                assert 0.0 <= iv["low"] <= iv["high"] <= 1.0, (method, lab["name"], iv)
                assert _inside(iv), (method, lab["name"], metric, iv)
                assert iv["draws"] > 190
            assert 0.0 <= res["precision_at_k"][lab["name"]] <= 1.0
            assert 0.0 <= res["knn_auroc"][lab["name"]] <= 1.0
    ours, rand = report["methods"]["ours"], report["methods"]["random_init"]
    assert ours["knn_auroc"] != rand["knn_auroc"]  # different weights, different features
    # the view is visible in raw pixels: the baseline must find it (a sanity check of the probe)
    assert report["methods"]["pixels"]["labels"][0]["auroc"]["estimate"] > 0.7
    on_disk = json.loads((out / "report.json").read_text())  # strict JSON (no NaN tokens)
    assert (
        on_disk["methods"]["ours"]["labels"][1]["auroc"]
        == report["methods"]["ours"]["labels"][1]["auroc"]
    )


def test_report_compares_the_encoder_with_each_baseline_on_the_same_draws(probe_run):
    """The encoder minus each baseline, per label, with a paired patient-bootstrap interval
    over the same 200 draws as each method's own interval; and mAP beside precision@k."""
    report, out, said = probe_run
    comp = report["comparisons"]
    assert comp["reference"] == "ours" and set(comp["methods"]) == {"random_init", "pixels"}
    for method, res in comp["methods"].items():
        for i, row in enumerate(res["labels"]):
            ours = report["methods"]["ours"]["labels"][i]["auroc"]
            other = report["methods"][method]["labels"][i]["auroc"]
            d = row["auroc_diff"]
            assert d["estimate"] == pytest.approx(ours["estimate"] - other["estimate"])
            assert d["low"] <= d["high"] and d["draws"] > 190 and row["n_scored"] == 160
            assert d["excludes_zero"] == (d["low"] > 0 or d["high"] < 0)
            assert row["seeds"] is None  # one probe seed by default
    for res in report["methods"].values():
        assert res["labels"][0]["seeds"] is None
        for name in LABELS:
            assert 0 < res["retrieval_map"][name] <= 1
    md = (out / "report.md").read_text()
    assert "Paired difference, encoder (frozen) minus each baseline" in md
    assert "| encoder (frozen) minus | ΔAUROC [95% CI] | ΔAUPRC [95% CI] |" in md
    on_disk = json.loads((out / "report.json").read_text())
    assert (
        on_disk["comparisons"]["methods"]["pixels"]["labels"][0]["auroc_diff"]
        == (comp["methods"]["pixels"]["labels"][0]["auroc_diff"])
    )


def test_report_markdown_and_plots(probe_run):
    report, out, said = probe_run
    md = (out / "report.md").read_text()
    for text in (
        "## view=AP (positive: AP)",
        "## sex=F (positive: F)",
        "random init",
        "pixels",
        "AUROC [95% CI]",
        "precision@k",
        "plots/roc_view_AP.png",
    ):
        assert text in md, text
    pngs = [*report["plots"]["roc"].values(), report["plots"]["pca"]]
    assert len(pngs) == 3
    for p in pngs:
        data = Path(p).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        assert Path(p).parent == out / "plots"


def test_segmentation_probe_reports_dice_for_encoder_and_random_init(probe_run):
    report, out, said = probe_run
    seg = report["segmentation"]
    assert set(seg["methods"]) == {"ours", "random_init"}
    for res in seg["methods"].values():
        assert res["n_train"] == 12 and res["n_test"] == 4
        assert res["dice"]["disc"] > res["trivial_dice"]["disc"] + 0.3
    md = (out / "report.md").read_text()
    assert "## Segmentation probe (held-out Dice)" in md and "| disc |" in md


def test_segmentation_holds_out_whole_patients(tmp_path, seg_csv):
    """The seg split was by image: with two radiographs per patient, a held-out image's twin
    was in training (6 of 8 test images with the seed-0 split of 32 images)."""
    from radjepa.eval.segmentation import held_out_split, load_seg_csv

    rows = seg_csv.read_text().splitlines()
    lines = ["image,disc,patient_id"]
    for i, row in enumerate(rows[1:]):  # every image twice, as one patient's two studies
        img, mask = (str(seg_csv.parent / x) for x in row.split(","))
        lines += [f"{img},{mask},p{i}", f"{img},{mask},p{i}"]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    images, masks, groups = load_seg_csv(tmp_path / "pairs.csv", ["disc"], size=64)
    assert images.shape == (32, 64, 64) and groups is not None
    assert groups.tolist() == [f"p{i // 2}" for i in range(32)]
    train, test = held_out_split(32, groups, 0.25, 0)
    assert len(test) == 8 and not set(groups[train]) & set(groups[test])
    assert load_seg_csv(seg_csv, ["disc"], size=64)[2] is None  # no column: per image


def test_segmentation_refuses_masks_of_other_proportions(tmp_path, seg_csv):
    """A mask stored stretched to 256x320 for a 256x256 image was centre-cropped on its own:
    on 10 NIH images the loaded masks had Dice 0.85 with the true ones, silently. A
    half-resolution mask of the same proportions still works."""
    from PIL import Image

    from radjepa.eval.features import DatasetError
    from radjepa.eval.segmentation import load_seg_csv

    img, mask = (seg_csv.parent / x for x in seg_csv.read_text().splitlines()[1].split(","))
    m = np.asarray(Image.open(mask))
    Image.fromarray(m).resize((256, 320), Image.NEAREST).save(tmp_path / "tall.png")
    Image.fromarray(m[::2, ::2]).save(tmp_path / "half.png")
    for name in ("tall", "half"):
        (tmp_path / f"{name}.csv").write_text(f"image,disc\n{img},{tmp_path / name}.png\n")
    _, half, _ = load_seg_csv(tmp_path / "half.csv", ["disc"], size=64)
    _, full, _ = load_seg_csv(seg_csv, ["disc"], size=64)
    assert (half[0] == full[0]).mean() > 0.97
    with pytest.raises(DatasetError, match="256x320 but the image is 256x256"):
        load_seg_csv(tmp_path / "tall.csv", ["disc"], size=64)


def test_saved_head_reproduces_predictions_and_names_its_encoder(
    probe_run, checkpoint, tiny_cfg, nih_dir
):
    from radjepa.checkpoint import load_encoder
    from radjepa.eval.features import extract_features, load_csv_dataset
    from radjepa.eval.heads import checkpoint_fingerprint, load_head
    from radjepa.eval.linear_probe import fit_head

    report, out, said = probe_run
    head = load_head(out / "head")
    # the folder it is logged in is the one it is in (it was logged in the staging folder, gone
    # once the probe ended: a user gave that to `serve --head`)
    where = [m for m in said if "probe head" in m]
    assert where == [
        f"probe head (2 labels, dim 192) saved to {out / 'head'} (for `radjepa serve --head`)"
    ]
    assert head.label_names == LABELS and head.positive == ["AP", "F"]
    assert head.encoder["sha256"] == checkpoint_fingerprint(checkpoint)
    assert head.encoder["which"] == "target"
    assert head.encoder["step"] == 0 and head.encoder["meta"]["model"]["arch"] == "vit_tiny"
    encoder, _ = load_encoder(checkpoint, which="target")
    assert head.feature_dim == encoder.embed_dim
    ds = load_csv_dataset(nih_dir / "labels.csv", label_cols=LABELS, size=256, limit=160)
    feats = extract_features(encoder, ds.images, batch_size=64)
    refit = fit_head(feats, ds.labels, label_names=LABELS, c=tiny_cfg.probe.logreg_c)
    probs = head.predict_proba(feats)
    assert probs.shape == (160, 2) and np.all((probs > 0) & (probs < 1))
    np.testing.assert_allclose(probs, refit.predict_proba(feats), rtol=0, atol=1e-9)


def test_cli_probe_logs_metrics_artifacts_and_registers_head(
    tmp_path, checkpoint, nih_dir, monkeypatch
):
    import mlflow
    from typer.testing import CliRunner

    from pipelines.cli import app
    from radjepa.eval.heads import load_head

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "probe-cli"
    args = [
        "probe",
        str(checkpoint),
        "--csv",
        str(nih_dir / "labels.csv"),
        "--label",
        "view=AP",
        "--label",
        "sex=F",
        "--out",
        str(out),
        "--limit",
        "100",
        "-c",
        str(REPO / "configs" / "tiny_cpu.yaml"),
        "--set",
        "probe.bootstrap=50",
        "--set",
        "probe.seeds=2",
        "--set",
        "model.depth=2",
        "--set",
        f"train.output_dir={tmp_path / 'runs'}",
        "--register-head",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "view=AP AUROC" in res.output and "models:/radjepa-probe-head/1" in res.output
    # the store pretrain registers encoders in, so serve resolves the head there too
    uri = f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}"
    assert not (out / "mlflow.db").exists()
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("radjepa")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["radjepa.job"] == "probe"
    metrics = run.data.metrics
    for method in ("ours", "random_init", "pixels"):
        for lab in ("view_AP", "sex_F"):
            auc = metrics[f"{method}/{lab}/auroc"]
            assert (
                metrics[f"{method}/{lab}/auroc_ci_low"]
                <= auc
                <= metrics[f"{method}/{lab}/auroc_ci_high"]
            )
            assert not math.isnan(metrics[f"{method}/{lab}/precision_at_k"])
            assert 0 < metrics[f"{method}/{lab}/retrieval_map"] <= 1
            assert metrics[f"{method}/{lab}/auroc_seed_min"] <= auc
            assert auc <= metrics[f"{method}/{lab}/auroc_seed_max"]
        if method != "ours":  # the paired difference to each baseline, with its interval
            for lab in ("view_AP", "sex_F"):
                key = f"ours_vs_{method}/{lab}/auroc_diff"
                diff = metrics[f"ours/{lab}/auroc"] - metrics[f"{method}/{lab}/auroc"]
                assert metrics[key] == pytest.approx(diff, abs=1e-9)
                assert metrics[f"{key}_ci_low"] <= metrics[f"{key}_ci_high"]
                assert metrics[f"{key}_excludes_zero"] in (0.0, 1.0)
                assert f"{key}_seed_mean" in metrics
    assert "ΔAUROC ours-random_init " in res.output
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["seeds"] == 2
    # a label with few patients in a class says its interval is unreliable on its own line
    for lab in report["methods"]["ours"]["labels"]:
        (line,) = [x for x in res.output.splitlines() if f"{lab['name']} AUROC" in x]
        assert line.endswith("interval unreliable)") == (not lab["interval_reliable"]), line
    assert metrics["ours/view_AP/precision_at_k_chance"] > 0
    assert (
        metrics["ours/view_AP/auroc"] == report["methods"]["ours"]["labels"][0]["auroc"]["estimate"]
    )
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.md", "plots", "head"} <= top
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/pca_patch_features.png" in plots and "plots/roc_sex_F.png" in plots
    (mv,) = client.search_model_versions("name='radjepa-probe-head'")
    assert mv.run_id == run.info.run_id and mv.source.endswith("/head")
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path="head",
        dst_path=str(tmp_path / "dl"),
        tracking_uri=uri,
    )
    fetched, saved = load_head(local), load_head(out / "head")
    x = np.random.default_rng(0).normal(size=(5, saved.feature_dim))
    assert np.array_equal(fetched.predict_proba(x), saved.predict_proba(x))

    # Ctrl-C while the report is recorded ends the run KILLED, as pretrain and sweep mark an
    # interruption, not FAILED
    from pipelines import tracking_probe
    from radjepa.config import load_config

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [f"train.output_dir={tmp_path / 'runs'}"])
    # a probe of a registered encoder records which version it was: the checkpoint path is
    # the registry cache's, and an alias moves
    asked = "models:/tiny-enc@champion"
    of_version = tracking_probe.log_probe_run(report, out, cfg, model=("tiny-enc", "3", asked))
    tagged = client.get_run(of_version.run_id)
    assert tagged.info.run_name == "probe-tiny-enc-v3"
    assert tagged.data.tags["radjepa.model_ref"] == "models:/tiny-enc/3"
    assert tagged.data.tags["radjepa.model_asked"] == asked
    assert "radjepa.model_ref" not in run.data.tags  # the CLI's probe of a folder
    # the registered head's labels tag named every requested label, also one the probe
    # skipped (the head has no output for it): it names the head's own outputs
    asked_labels = [*report["data"]["labels"], {"name": "rare", "positive": None, "n_pos": 1}]
    with_skipped = {**report, "data": {**report["data"], "labels": asked_labels}}
    reg = tracking_probe.log_probe_run(with_skipped, out, cfg, register_head=True)
    assert reg.head_model is not None and reg.head_version is not None
    tags = client.get_model_version(reg.head_model, reg.head_version).tags
    assert tags["radjepa.labels"] == ",".join(saved.label_names) == "view=AP,sex=F"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking_probe, "end_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tracking_probe.log_probe_run(report, out, cfg)
    ended = {run.info.run_id, of_version.run_id, reg.run_id}
    (killed,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id not in ended]
    assert killed.info.status == "KILLED"


def test_cli_refuses_bad_input_with_a_readable_error(tmp_path, checkpoint, nih_dir, monkeypatch):
    from pipelines.cli import UserError
    from pipelines.cli_probe import probe_cmd

    with pytest.raises(UserError, match="never occurs"):
        probe_cmd(
            checkpoint,
            ["view=LATERAL"],
            tmp_path / "x",
            csv=nih_dir / "labels.csv",
            mlflow=False,
            limit=20,
        )
    with pytest.raises(UserError, match="exactly one of --csv or --shards"):
        probe_cmd(checkpoint, ["sex"], tmp_path / "y", mlflow=False)
    with pytest.raises(UserError, match="checkpoint not found"):
        probe_cmd(tmp_path / "nope", ["sex"], tmp_path / "z", csv=nih_dir / "labels.csv")
    assert not (tmp_path / "x" / "report.json").exists()
    # click turned s3://b/out into the path s3:/b/out: the report went to a folder ./s3: here
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    cases = {
        "--out": {"out": "s3://b/out", "csv": str(nih_dir / "labels.csv")},
        "--csv": {"out": str(tmp_path / "o"), "csv": "gs://b/labels.csv"},
        "--seg-csv": {
            "out": str(tmp_path / "o"),
            "csv": str(nih_dir / "labels.csv"),
            "seg_csv": "file:///masks.csv",
            "structure": ["heart"],
        },
    }
    for option, args in cases.items():
        scheme = args.get("seg_csv", args["out"] if option == "--out" else args["csv"])
        scheme = scheme.split("://")[0]
        with pytest.raises(
            UserError, match=f"^{option} takes a path on this machine, not a {scheme}:// URI"
        ):
            probe_cmd(checkpoint, ["sex"], mlflow=False, **args)
    assert list(work.iterdir()) == [] and not (tmp_path / "o").exists()
    # a local name with a colon is a path
    from pipelines.cli_probe import _refuse_uri

    for name in ("data:v2/out", "out:/x", "s3:b/out"):
        _refuse_uri("--out", name)


def test_cli_says_in_one_line_when_mlflow_refuses_the_store_and_keeps_the_report(
    tmp_path, checkpoint, nih_dir, monkeypatch
):
    # MLflow refuses a file: store (`tracking.uri=file:///...`, an old ./mlruns habit): pretrain
    # and sweep said so in one line, but probe, having written its report, ended in a
    # 60-line MlflowException traceback with exit code 1
    from pipelines.cli import UserError
    from pipelines.cli_probe import probe_cmd

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out = tmp_path / "probe"
    with pytest.raises(UserError, match=r"cannot record the probe in MLflow: .*--no-mlflow"):
        probe_cmd(
            checkpoint,
            ["sex=F"],
            out,
            csv=nih_dir / "labels.csv",
            limit=20,
            set_=[f"tracking.uri={(tmp_path / 'mlruns').as_uri()}", "probe.bootstrap=0"],
        )
    assert (out / "report.json").is_file() and (out / "head" / "head.json").is_file()


def test_cli_refuses_labels_that_would_overwrite_each_other_and_an_empty_limit(
    tmp_path, checkpoint, nih_dir
):
    # `view=AP` and a column `view_AP` are one MLflow metric name and one plot file: the
    # second label's numbers silently replaced the first's; --limit 0 was an IndexError
    from typer.testing import CliRunner

    from pipelines.cli import UserError, app
    from pipelines.cli_probe import probe_cmd

    labels = tmp_path / "labels.csv"
    rows = (nih_dir / "labels.csv").read_text().splitlines()
    header = rows[0].split(",")
    view = header.index("view")
    labels.write_text(
        "\n".join(
            [rows[0] + ",view_AP"] + [f"{r},{int(r.split(',')[view] == 'AP')}" for r in rows[1:41]]
        )
        + "\n"
    )
    for p in {r.split(",")[0] for r in rows[1:41]}:
        (tmp_path / p).parent.mkdir(exist_ok=True)
        (tmp_path / p).write_bytes((nih_dir / p).read_bytes())
    for pair in (["view=AP", "view_AP"], ["sex", "sex"]):
        with pytest.raises(UserError, match="share the MLflow metric name"):
            probe_cmd(checkpoint, pair, tmp_path / "out", csv=labels, mlflow=False)
    assert not (tmp_path / "out" / "report.json").exists()
    res = CliRunner().invoke(
        app, ["probe", str(checkpoint), "--csv", str(labels), "--label", "sex", "--limit", "0"]
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    with pytest.raises(UserError, match="limit 0"):
        probe_cmd(checkpoint, ["sex"], tmp_path / "out", csv=labels, mlflow=False, limit=0)


def test_cli_refuses_a_single_patient_set_in_one_line(tmp_path, checkpoint, nih_dir):
    """Every image of one patient (or every patient_id blank before blanks became their own
    patients) ended in a ValueError traceback from precision@k after all labels were skipped."""
    from pipelines.cli import UserError
    from pipelines.cli_probe import probe_cmd

    rows = (nih_dir / "labels.csv").read_text().splitlines()
    header, body = rows[0], rows[1:21]
    one = [",".join([r.split(",")[0], "42", *r.split(",")[2:]]) for r in body]
    one_csv = tmp_path / "one.csv"
    one_csv.write_text("\n".join([header, *one]) + "\n")
    for p in {r.split(",")[0] for r in body}:
        (tmp_path / p).parent.mkdir(exist_ok=True)
        (tmp_path / p).write_bytes((nih_dir / p).read_bytes())
    one_patient = r"20 images have the same 'patient_id' \(one patient\): "
    with pytest.raises(UserError, match=one_patient) as exc:
        probe_cmd(checkpoint, ["view=AP"], tmp_path / "out", csv=one_csv, mlflow=False)
    assert not (tmp_path / "out" / "report.json").exists()
    # not the patient id (an MRN), nor, for an image that is its own patient, its path (a
    # file name often holds the patient's name): the message reaches a console or a job's log
    assert "42" not in str(exc.value)
    with pytest.raises(UserError, match=r"only 1 image: ") as exc:
        probe_cmd(
            checkpoint,
            ["view=PA"],
            tmp_path / "out",
            csv=one_csv,
            mlflow=False,
            limit=1,
            group_col="",
        )
    assert str(tmp_path) not in str(exc.value) and ".png" not in str(exc.value)


def test_cli_refuses_a_device_this_machine_cannot_use_in_one_line(tmp_path, checkpoint, nih_dir):
    """`--device gpu` was torch's RuntimeError listing every device type, `--device cuda` on a
    machine without a GPU a driver traceback; both are refused before the encoder loads."""
    import torch

    from pipelines.cli import UserError
    from pipelines.cli_probe import probe_cmd

    csv = nih_dir / "labels.csv"
    with pytest.raises(UserError, match="device 'gpu': use cpu, cuda, cuda:N or auto"):
        probe_cmd(checkpoint, ["sex=F"], tmp_path / "out", csv=csv, device="gpu", mlflow=False)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(UserError, match=f"device 'cuda:{n}': torch sees {n} CUDA device"):
        probe_cmd(
            checkpoint, ["sex=F"], tmp_path / "out", csv=csv, device=f"cuda:{n}", mlflow=False
        )
    assert not (tmp_path / "out" / "report.json").exists()


def test_cli_refuses_a_diverged_checkpoint_in_one_line(tmp_path, tiny_cfg, nih_dir):
    """NaN weights (a run that diverged between loss checks) ended in a scikit-learn traceback
    ("Input X contains NaN ... consider HistGradientBoostingClassifier")."""
    import torch

    from pipelines.cli import UserError
    from pipelines.cli_probe import probe_cmd
    from radjepa.checkpoint import save_checkpoint
    from radjepa.engine import Pretrainer

    trainer = Pretrainer(tiny_cfg, "cpu")
    with torch.no_grad():
        next(trainer.model.target_encoder.parameters()).fill_(float("nan"))
    ckpt = save_checkpoint(tmp_path / "step-9", trainer)
    with pytest.raises(UserError, match="NaN/inf features .*probe an earlier checkpoint"):
        probe_cmd(
            ckpt, ["view=AP"], tmp_path / "out", csv=nih_dir / "labels.csv", mlflow=False, limit=20
        )
    assert not (tmp_path / "out" / "report.json").exists()


def test_probe_decodes_images_as_serving_does_for_the_checkpoint(tmp_path, nih_dir, seg_csv):
    """A checkpoint trained on 128 px uint16 shards with a [2, 98] window, probed without
    --config: the head and the Dice must come from the pixels serving feeds this encoder."""
    from serve_helpers import dicom_from_png, nih_pngs

    from radjepa.checkpoint import load_encoder, save
    from radjepa.config import load_config
    from radjepa.eval.features import extract_features
    from radjepa.eval.heads import load_head
    from radjepa.eval.linear_probe import fit_head
    from radjepa.eval.runner import run_probe
    from radjepa.eval.segmentation import load_seg_csv, seg_probe, tokens_to_grid
    from radjepa.imaging.decode import decode_image
    from radjepa.models.encoder import build_encoder
    from serve.embedder import EncoderRunner

    tiny = REPO / "configs" / "tiny_cpu.yaml"
    ingest = ["ingest.image_size=128", "ingest.dtype=uint16", "ingest.window_percentiles=[2,98]"]
    ckpt_cfg = load_config(tiny, ["model.depth=2", *ingest])
    ckpt = save(tmp_path / "ckpt", build_encoder(ckpt_cfg), ckpt_cfg, step=3)
    # 8-bit DICOMs without a VOI window: the percentile window sets their contrast
    rows, files = ["image,patient_id,sex"], []
    for i, png in enumerate(nih_pngs(nih_dir, 16)):
        files.append(tmp_path / f"{i}.dcm")
        files[-1].write_bytes(dicom_from_png(png))
        rows.append(f"{i}.dcm,p{i},{'FM'[i % 2]}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(tiny, ["probe.bootstrap=0"])  # the probe command's defaults
    report = run_probe(
        ckpt,
        tmp_path / "labels.csv",
        ["sex=F"],
        tmp_path / "out",
        cfg,
        seg_csv=seg_csv,
        structures=["disc"],
    )

    pre = EncoderRunner.from_checkpoint(ckpt).preprocess  # what /v1/* decode uploads with
    settings = {
        "size": pre.image_size,
        "dtype": pre.dtype,
        "window_percentiles": pre.window_percentiles,
    }
    assert report["data"]["decode"] == {**settings, "window_percentiles": [2.0, 98.0]}
    served = [decode_image(f.read_bytes(), secret=b"k" * 32, **settings).pixels for f in files]
    encoder, _ = load_encoder(ckpt)
    feats = extract_features(encoder, served, batch_size=cfg.probe.batch_size)
    y = np.array([i % 2 == 0 for i in range(16)], np.int8)
    refit = fit_head(feats, y, label_names=["sex=F"], c=cfg.probe.logreg_c, seed=cfg.probe.seed)
    np.testing.assert_allclose(
        load_head(report["head"]).predict_proba(feats), refit.predict_proba(feats), atol=1e-9
    )
    images, masks, _ = load_seg_csv(seg_csv, ["disc"], **settings)
    tokens = extract_features(encoder, images, batch_size=cfg.probe.batch_size, patch_tokens=True)
    dice = seg_probe(tokens_to_grid(tokens), masks, structures=["disc"], seed=cfg.probe.seed).dice
    assert report["segmentation"]["methods"]["ours"]["dice"] == pytest.approx(dice, abs=1e-12)


def test_probe_on_shards_of_mixed_formats_leaves_out_images_without_the_label(
    tmp_path, checkpoint, tiny_cfg, nih_dir, seg_csv, caplog
):
    # an archive of DICOMs and PNGs: the PNGs' shard rows carry no view_position, and the
    # probe refused the whole set ("fill or drop them") although a shard cannot be edited.
    # Its mask CSV is split by its patient_id: it was looked up as the shards' patient_pid,
    # which no mask CSV has, and split image by image
    import hashlib

    from shard_tables import write_shard

    from radjepa.eval.features import load_csv_dataset, read_csv_rows
    from radjepa.eval.runner import run_probe

    n = 48
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    ds = load_csv_dataset(nih_dir / "labels.csv", size=64, limit=n)
    meta = read_csv_rows(nih_dir / "labels.csv")[:n]
    png = set(range(0, n, 6))  # eight images "from PNG files": no metadata
    write_shard(
        tmp_path / "shards",
        ds.images,
        image_id=ids,
        patient_pid=[None if i in png else r["patient_id"] for i, r in enumerate(meta)],
        view_position=[None if i in png else r["view"] for i, r in enumerate(meta)],
        sex=[None if i in png else r["sex"] for i, r in enumerate(meta)],
    )

    rows = seg_csv.read_text().splitlines()
    masks = [
        f"{seg_csv.parent / a},{seg_csv.parent / b},p{i // 2}"
        for i, r in enumerate(rows[1:])
        for a, b in [r.split(",")]
    ]
    (tmp_path / "masks.csv").write_text("\n".join(["image,disc,patient_id", *masks]) + "\n")
    report = run_probe(
        checkpoint,
        None,
        ["view_position=AP", "sex=F"],
        tmp_path / "out",
        tiny_cfg,
        shards=tmp_path / "shards",
        group_col="patient_pid",
        seg_csv=tmp_path / "masks.csv",
        structures=["disc"],
    )
    assert report["segmentation"]["grouped_by"] == "patient_id"
    # shards stored at 64 px, a model that decodes uploads at its own size: said
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("made with ingest.image_size=64" in m and "the served head" in m for m in said)
    assert report["data"]["n_images"] == n - len(png)
    assert [r["image_id"] for r in report["data"]["rejected"]] == [ids[i] for i in sorted(png)]
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"{len(png)} left out" in md and f"- image `{ids[6][:16]}`: no_label" in md


def _nih_shards(nih_dir: Path, out: Path, n: int = 24) -> int:
    """Shards of the first ``n`` NIH images at 64 px, two images per patient, with their sex
    as a label column; returns ``n``."""
    import hashlib

    from shard_tables import write_shard

    from radjepa.eval.features import load_csv_dataset, read_csv_rows

    ds = load_csv_dataset(nih_dir / "labels.csv", size=64, limit=n)
    meta = read_csv_rows(nih_dir / "labels.csv")[:n]
    write_shard(
        out,
        ds.images,
        image_id=[hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)],
        patient_pid=[f"pid{i // 2}" for i in range(n)],  # two images per patient
        sex=[r["sex"] for r in meta],
    )
    return n


def test_probe_on_shards_groups_by_their_patient_column_by_default(
    tmp_path, checkpoint, tiny_cfg, nih_dir
):
    """run_probe's default patient column was the CSV's patient_id also for shards, whose
    column is patient_pid: called with shards and no group_col it refused them as missing a
    column (only the CLI put in the right name). Each source now gets its own default."""

    from radjepa.eval.runner import run_probe

    n = _nih_shards(nih_dir, tmp_path / "shards")
    report = run_probe(
        checkpoint, None, ["sex=F"], tmp_path / "out", tiny_cfg, shards=tmp_path / "shards"
    )
    assert report["data"]["n_images"] == n and report["data"]["n_patients"] == n // 2


def test_a_bad_mask_csv_is_refused_before_the_probe_touches_an_earlier_report(
    tmp_path, checkpoint, nih_dir, seg_csv
):
    """The mask CSV was read after the probe had saved its head and plots: re-probing into
    the folder of an earlier run with a mask column misspelt overwrote that run's head and
    ROC plot, kept its report.json, and exited with the CSV error, leaving a head the report
    does not describe. The CSV is now read first, so nothing in --out changes."""
    from pipelines.cli import UserError
    from pipelines.cli_probe import probe_cmd

    out = tmp_path / "probe"
    args = {"csv": nih_dir / "labels.csv", "mlflow": False, "set_": ["probe.bootstrap=0"]}
    probe_cmd(checkpoint, ["sex=F"], out, limit=40, **args)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert out / "head" / "head.safetensors" in before
    with pytest.raises(UserError, match=r"masks.csv: missing column\(s\) \['lung'\]"):
        probe_cmd(checkpoint, ["sex=F"], out, limit=30, seg_csv=seg_csv, structure=["lung"], **args)
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before


def test_a_probe_over_shards_records_how_the_shards_pixels_were_made(
    tmp_path, checkpoint, tiny_cfg, nih_dir
):
    """report.json's data.decode and MLflow's ingest.* params gave the checkpoint's decode
    settings (256 px here) for a probe over shards stored at 64 px: they named pixels the
    probe never scored, and the mismatch was only a log line. The shards' settings, and the
    mismatch, are now in the report and its markdown, and are the ingest.* params."""

    from pipelines.tracking_probe import probe_params
    from radjepa.eval.runner import run_probe

    _nih_shards(nih_dir, tmp_path / "shards")
    report = run_probe(
        checkpoint, None, ["sex=F"], tmp_path / "out", tiny_cfg, shards=tmp_path / "shards"
    )
    data = report["data"]
    assert data["decode"]["size"] == tiny_cfg.ingest.image_size == 256  # the checkpoint's
    # no manifest records a window for these shards: unknown, not the checkpoint's
    assert data["shards_decode"] == {"size": 64, "dtype": "uint8", "window_percentiles": None}
    assert "made with ingest.image_size=64" in data["decode_mismatch"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())["data"]
    assert saved["shards_decode"] == data["shards_decode"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"- **decode mismatch**: {data['decode_mismatch']}" in md
    params = probe_params(report, tiny_cfg)
    assert params["ingest.image_size"] == 64 and params["ingest.dtype"] == "uint8"
    assert params["ingest.window_percentiles"] == "unknown"
    assert params["decode_mismatch"] == data["decode_mismatch"]
    # a labels CSV is decoded with the checkpoint's settings: those are the params, no mismatch
    csv_report = run_probe(
        checkpoint, nih_dir / "labels.csv", ["sex=F"], tmp_path / "csv", tiny_cfg, limit=24
    )
    assert csv_report["data"]["shards_decode"] is None
    assert csv_report["data"]["decode_mismatch"] is None
    assert "decode mismatch" not in (tmp_path / "csv" / "report.md").read_text()
    params = probe_params(csv_report, tiny_cfg)
    assert params["ingest.image_size"] == 256 and "decode_mismatch" not in params
    assert params["ingest.window_percentiles"] == (0.5, 99.5)
