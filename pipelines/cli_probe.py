"""``radjepa probe``: the linear-probe command and the helpers only it uses, refusing a URI
where probe reads or writes on this machine and printing each label's paired AUROC differences.
Its checks before the probe and its printed summary make it the longest command.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.cli_common import ConfigOpt, RunFailed, SetOpt, UserError, load
from radjepa.error_text import first_line


def _refuse_uri(option: str, value: str | Path | None) -> None:
    """A URI given where a path on this machine is read or written: as a click ``Path``,
    ``probe --out s3://b/out`` was the path ``s3:/b/out``, and the report went to a folder
    ``./s3:`` here. Taken as typed (a string), so a local name with a colon stays a path."""
    scheme, sep, _ = str(value).partition("://")
    if value is not None and sep and re.fullmatch(r"[A-Za-z][\w+.\-]*", scheme):
        raise UserError(
            f"{option} takes a path on this machine, not a {scheme}:// URI: probe reads its "
            "CSVs and writes its report here (its --shards may be a URI)"
        )


def _paired_cells(report: dict[str, Any], label: str) -> list[str]:
    """``ours-pixels +0.052 [+0.010, +0.094] *`` per baseline: the paired AUROC difference,
    marked as the report's table marks it (``*`` interval excludes 0, ``†`` after Holm)."""
    from radjepa.eval.report import diff_marks, fmt3

    comp = report.get("comparisons") or {}
    cells = []
    for method, res in (comp.get("methods") or {}).items():
        row = next((r for r in res["labels"] if r["name"] == label), None)
        d = (row or {}).get("auroc_diff")
        if d is None:
            continue
        cell = f"{comp['reference']}-{method} {fmt3(d['estimate'], signed=True)}"
        if d["draws"]:
            cell += f" [{fmt3(d['low'], True)}, {fmt3(d['high'], True)}]"
            cell += diff_marks(d)
        cells.append(cell)
    return cells


def probe_cmd(
    checkpoint: Annotated[
        str,
        typer.Argument(help="Checkpoint folder or URI from `radjepa pretrain`, or models:/..."),
    ],
    label: Annotated[
        list[str],
        typer.Option(
            "--label", "-l", help="Label column, or COLUMN=POSITIVE (e.g. view=AP); repeat."
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the report, plots and head; an earlier probe's is replaced.",
        ),
    ],
    csv: Annotated[
        str | None,
        typer.Option("--csv", help="Labels CSV: image paths (relative to it) + label columns."),
    ] = None,
    shards: Annotated[
        str | None,
        typer.Option(
            "--shards",
            help="Ingest output instead of --csv (labels from metadata), a path or URI.",
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    image_col: Annotated[str, typer.Option(help="CSV column with image paths.")] = "image",
    group_col: Annotated[
        str | None, typer.Option(help="Patient-id column (default: patient_id, or patient_pid).")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N rows.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: auto).")] = None,
    seg_csv: Annotated[
        str | None,
        typer.Option("--seg-csv", help="Image + mask-path columns for a segmentation probe."),
    ] = None,
    structure: Annotated[
        list[str] | None,
        typer.Option("--structure", help="Mask column of --seg-csv (repeat per structure)."),
    ] = None,
    seg_group_col: Annotated[
        str | None,
        typer.Option(
            "--seg-group-col",
            help="Patient-id column of --seg-csv (default: --group-col's with --csv, else "
            "patient_id).",
        ),
    ] = None,
    mlflow: Annotated[
        bool, typer.Option("--mlflow/--no-mlflow", help="Log the run to MLflow.")
    ] = True,
    register_head: Annotated[
        bool, typer.Option("--register-head", help="Register the head in the MLflow registry.")
    ] = False,
    head_name: Annotated[
        str, typer.Option(help="Registered model name for --register-head.")
    ] = "radjepa-probe-head",
) -> None:
    """Linear-probe a frozen encoder on labelled images; report AUROC/AUPRC vs two baselines."""
    cfg = load(config, set_)
    if register_head and not (mlflow and cfg.tracking.enabled):
        raise UserError("--register-head needs MLflow tracking (drop --no-mlflow)")
    if register_head:  # MLflow refuses a bad name only at the end, after the whole probe
        from radjepa.config import check_registry_name

        try:
            check_registry_name(head_name)
        except ValueError as err:
            raise UserError(f"--head-name: {err}") from None
    if (csv is None) == (shards is None):
        raise UserError("give exactly one of --csv or --shards")
    for option, value in (("--out", out), ("--csv", csv), ("--seg-csv", seg_csv)):
        _refuse_uri(option, value)
    out_dir = Path(out)
    csv_file, seg_file = (None if v is None else Path(v) for v in (csv, seg_csv))
    if seg_file is not None and not structure:
        raise UserError("--seg-csv needs at least one --structure (a mask column)")
    from pipelines.tracking import check_reachable, store_uri
    from radjepa.checkpoint import CheckpointError
    from radjepa.eval.features import DatasetError, resolve_device
    from radjepa.eval.outdir import check_out_dir
    from radjepa.eval.runner import run_probe
    from serve.registry import ModelNotFound, resolve_model

    try:  # run_probe checks these too; here they come before a models:/ fetch
        check_out_dir(out_dir)
        resolve_device(device)
    except DatasetError as err:
        raise UserError(str(err)) from None
    uri = store_uri(cfg)
    if mlflow and cfg.tracking.enabled:
        # what would refuse the run's record at the end, after the whole probe: said first
        from pipelines.tracking import check_store_in_place
        from pipelines.tracking_probe import probe_store

        try:  # no store (ValueError), or one moved or copied (StoreMoved, a ValueError)
            check_store_in_place(probe_store(cfg), cfg.tracking.experiment)
        except ValueError as err:
            raise UserError(str(err)) from None
    if mlflow and cfg.tracking.enabled and uri and not str(checkpoint).startswith("models:/"):
        # the run is logged after the whole probe: a server that does not answer was found
        # only then, and MLflow retried it for minutes. A models:/ look-up asks it itself,
        # naming the reference (no tracking.enabled=false way out for that one)
        try:
            check_reachable(uri)
        except ConnectionError as err:
            raise UserError(str(err)) from None
    try:
        resolved = resolve_model(str(checkpoint), tracking_uri=uri)
    except ModelNotFound as err:
        raise UserError(str(err)) from None
    try:
        report = run_probe(
            resolved.path,
            csv_file,
            label,
            out_dir,
            cfg,
            shards=shards,
            device=device,
            image_col=image_col,
            limit=limit,
            seg_csv=seg_file,
            structures=structure or [],
            group_col=group_col,  # None: the library's patient column for --csv or --shards
            seg_group_col=seg_group_col,
        )
    except (DatasetError, CheckpointError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    any_diff = False
    for lab in report["methods"]["ours"]["labels"]:
        cells = []
        for method, res in report["methods"].items():
            lr = next(x for x in res["labels"] if x["name"] == lab["name"])
            auc = lr["auroc"]
            if auc is None:
                cells.append(f"{method} skipped")
            elif auc["draws"]:
                cells.append(
                    f"{method} {auc['estimate']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]"
                )
            else:
                cells.append(f"{method} {auc['estimate']:.3f}")
        unreliable = "  (few patients in a class: interval unreliable)"
        typer.echo(
            f"{lab['name']:>16} AUROC  "
            + "  |  ".join(cells)
            + (unreliable if lab.get("interval_reliable") is False else "")
        )
        diffs = _paired_cells(report, lab["name"])
        if diffs:
            any_diff = True
            typer.echo(f"{'':>16} ΔAUROC " + "  |  ".join(diffs))
    if any_diff:
        typer.echo(
            f"{'':>16} * the interval excludes 0; † it still holds after Holm's correction "
            "over the baseline's labels"
        )
    for method, res in ((report.get("segmentation") or {}).get("methods") or {}).items():
        dice = ", ".join(
            f"{k} {v:.3f}" if math.isfinite(v) else f"{k} absent from the held-out images"
            for k, v in res["dice"].items()
        )
        typer.echo(f"{'segmentation':>16} Dice   {method} {dice}")
    typer.echo(f"report:      {report['files']['markdown']}")
    if report.get("head"):
        typer.echo(f"probe head:  {report['head']}")
    if mlflow and cfg.tracking.enabled:
        from pipelines.tracking import ui_command
        from pipelines.tracking_probe import log_probe_run

        try:
            registered = None
            if resolved.name and resolved.version:
                registered = (resolved.name, str(resolved.version), resolved.source)
            tr = log_probe_run(
                report,
                out_dir,
                cfg,
                register_head=register_head,
                head_model_name=head_name,
                model=registered,
            )
        except ValueError as err:  # no store for remote outputs, no head to register
            raise UserError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - the store failed after the probe's work
            # log_probe_run marked the run FAILED; one line saying where the results are, not
            # a traceback after a probe that may have taken hours
            first = first_line(str(err))[:500]
            raise RunFailed(
                f"cannot record the probe in MLflow: {type(err).__name__}: {first}; the report "
                f"and head are in {out_dir.resolve()}"
            ) from None
        typer.echo(f"mlflow run:  {tr.run_id}")
        if tr.head_version:
            typer.echo(f"head model:  models:/{tr.head_model}/{tr.head_version}")
        typer.echo(f"mlflow ui:   {ui_command(tr.uri)}")
