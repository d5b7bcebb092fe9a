"""`radjepa probe --out`: a re-run replaces an earlier probe's folder whole, a failed or
refused run changes nothing, and a folder that is not a probe's is never touched.

Real probes of the tiny random checkpoint on the NIH sample (few images, no bootstrap)."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import test_eval_run
from test_eval_run import REPO

# the tiny random checkpoint of the probe tests (module-scoped there, and here)
tiny_cfg = test_eval_run.tiny_cfg
checkpoint = test_eval_run.checkpoint

TWO = {"label": ["view=AP", "sex=F"], "limit": 40}
# the first 20 NIH rows hold one Edema image: the label is skipped, so no head and no ROC plot
SKIPPED = {"label": ["Edema"], "limit": 20}


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _probe(checkpoint, out, nih_dir, *, label, limit, sets=(), mlflow=False, **kw):
    from pipelines.cli_probe import probe_cmd

    probe_cmd(
        checkpoint,
        label,
        out,
        csv=nih_dir / "labels.csv",
        limit=limit,
        set_=["probe.bootstrap=0", *sets],
        mlflow=mlflow,
        **kw,
    )


def test_a_rerun_leaves_only_its_own_files_and_mlflow_logs_only_those(
    tmp_path, checkpoint, nih_dir, monkeypatch
):
    """Re-probing into an earlier run's folder kept that run's head/ and ROC plots beside the
    new report.json (whose head is null), and MLflow logged the stale plots as this run's."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "probe"
    _probe(checkpoint, out, nih_dir, **TWO)
    assert {"head/head.safetensors", "plots/roc_view_AP.png"} <= set(_files(out))
    runs = tmp_path / "runs"
    _probe(checkpoint, out, nih_dir, sets=[f"train.output_dir={runs}"], mlflow=True, **SKIPPED)

    report = json.loads((out / "report.json").read_text())
    assert report["head"] is None and report["plots"]["roc"] == {}
    assert set(_files(out)) == {"report.json", "report.md", "plots/pca_patch_features.png"}
    assert "![PCA map](plots/pca_patch_features.png)" in (out / "report.md").read_text()
    # the run was staged beside --out and swapped in: nothing of it is left around
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe", "runs"]
    client = mlflow.MlflowClient(f"sqlite:///{runs.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("radjepa").experiment_id])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "report.json",
        "report.md",
        "plots",
    }
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/pca_patch_features.png"}


def test_a_run_that_fails_while_writing_leaves_the_earlier_output_as_it_was(
    tmp_path, checkpoint, nih_dir
):
    """A write error (here the file-size limit, as a full disk would) after the first plots
    were written left the new ROC plot, a truncated PCA image and the old report.json together,
    and ended in an 80-line OSError traceback."""
    from pipelines.cli import UserError

    out = tmp_path / "probe"
    _probe(checkpoint, out, nih_dir, **TWO)
    before = _files(out)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # a ROC plot fits, PCA not
    try:
        with pytest.raises(UserError, match=r"File too large; .*probe is as it was before"):
            _probe(checkpoint, out, nih_dir, label=["sex=F"], limit=30)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["probe"]


def test_a_folder_that_is_not_a_probe_output_is_refused_and_left_alone(
    tmp_path, checkpoint, nih_dir
):
    """--out pointing at a folder of other files wrote the report among them; replacing such
    a folder would delete them, so it is refused in one line before any work."""
    from pipelines.cli import UserError

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me\n")
    earlier = tmp_path / "earlier"  # an earlier probe's folder with a user's file added
    _probe(checkpoint, earlier, nih_dir, **SKIPPED)
    (earlier / "plots" / "my-figure.svg").write_text("<svg/>")
    (tmp_path / "afile").write_text("x")
    expected = _files(tmp_path)
    for out, why in (
        (notes, r"holds files a probe does not write \(todo.txt\)"),
        (earlier, r"holds files a probe does not write \(plots/my-figure.svg\)"),
        (tmp_path / "afile" / "probe", "a file is in the way"),
    ):
        with pytest.raises(UserError, match=why) as err:
            _probe(checkpoint, out, nih_dir, **TWO)
        assert "\n" not in str(err.value)
    assert _files(tmp_path) == expected


def test_refusals_leave_the_file_system_untouched(tmp_path, checkpoint, nih_dir):
    """`--device cuda` without a GPU (and any refusal after it) was said in one line, but
    only after --out and its missing parents had been created."""
    import torch

    from pipelines.cli import UserError

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out = tmp_path / "new" / "probe"
    with pytest.raises(UserError, match=f"device 'cuda:{n}': torch sees {n} CUDA device"):
        _probe(checkpoint, out, nih_dir, device=f"cuda:{n}", **SKIPPED)
    with pytest.raises(UserError, match="never occurs"):  # found after the checkpoint loaded
        _probe(checkpoint, out, nih_dir, label=["view=LATERAL"], limit=20)
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_cannot_be_renamed_is_replaced_in_place(
    tmp_path, checkpoint, nih_dir, monkeypatch
):
    """`--out .`: the folder the process works in is not renamed away (the process would be
    left in a deleted folder); its entries are swapped instead, with the same result."""
    out = tmp_path / "probe"
    _probe(checkpoint, out, nih_dir, **TWO)
    monkeypatch.chdir(out)
    _probe(checkpoint, Path("."), nih_dir, **SKIPPED)
    assert Path.cwd() == out and (out / "report.json").is_file()
    assert set(_files(out)) == {"report.json", "report.md", "plots/pca_patch_features.png"}
    assert json.loads((out / "report.json").read_text())["head"] is None


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_a_mount_point_out_is_replaced_in_place(tmp_path, checkpoint, nih_dir):
    """A volume mounted at --out cannot be renamed (EBUSY): its entries are swapped instead.
    The tmpfs lives in a private mount namespace, gone when the probe process ends."""
    mnt = tmp_path / "volume"
    mnt.mkdir()
    script = textwrap.dedent(
        f"""
        import json, os, subprocess, sys
        from pathlib import Path
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", {str(mnt)!r}], check=True)
        from test_eval_outdir import TWO, SKIPPED, _files, _probe
        out, ckpt, nih = Path({str(mnt)!r}), Path({str(checkpoint)!r}), Path({str(nih_dir)!r})
        assert os.path.ismount(out)
        _probe(ckpt, out, nih, **TWO)
        first = set(_files(out))
        _probe(ckpt, out, nih, **SKIPPED)
        print(json.dumps([sorted(first), sorted(_files(out))]))
        """
    )
    cmd = ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", script]
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"])
    if probe.returncode != 0:
        pytest.skip("user and mount namespaces are not available here")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    first, second = json.loads(res.stdout.strip().splitlines()[-1])
    assert "head/head.safetensors" in first
    assert second == ["plots/pca_patch_features.png", "report.json", "report.md"]


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr (e2fsprogs)")
def test_an_out_whose_parent_is_not_writable_is_replaced_in_place(tmp_path, checkpoint, nih_dir):
    """No sibling can be made beside --out when its parent refuses new entries (here the
    immutable flag, which binds root too, standing in for a folder owned by someone else):
    the run is staged inside --out, as the old code's direct writes worked there too."""
    parent = tmp_path / "shared"
    out = parent / "probe"
    out.mkdir(parents=True)
    _probe(checkpoint, out, nih_dir, **TWO)
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("this file system or user cannot set the immutable flag")
    try:
        _probe(checkpoint, out, nih_dir, **SKIPPED)
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)
    assert set(_files(out)) == {"report.json", "report.md", "plots/pca_patch_features.png"}
    assert [p.name for p in parent.iterdir()] == ["probe"]
