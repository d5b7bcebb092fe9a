"""``run_probe``: one call from a checkpoint and a labels CSV to a report, plots and a head.

The encoder under test and both baselines are probed on the same images, the same patient
folds and the same bootstrap draws, so their numbers differ only by the features; the report's
``comparisons`` turns that pairing into an interval for the encoder minus each baseline.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from radjepa.config import Config, ProbeConfig
from radjepa.eval.baselines import pixel_features, random_init_encoder
from radjepa.eval.compare import compare_methods
from radjepa.eval.features import (
    Dataset,
    DatasetError,
    LabelSpec,
    extract_features,
    load_csv_dataset,
    load_shard_dataset,
    parse_label_spec,
    require_finite,
    resolve_device,
)
from radjepa.eval.heads import checkpoint_fingerprint, save_head
from radjepa.eval.linear_probe import cross_val_probe, fit_head
from radjepa.eval.outdir import check_out_dir, staged_out_dir
from radjepa.eval.plots import plot_pca_map, plot_roc
from radjepa.eval.report import metric_safe, write_report
from radjepa.eval.retrieval import retrieval_chance, retrieval_ok, retrieval_scores
from radjepa.eval.segmentation import load_seg_csv, seg_probe, tokens_to_grid

log = logging.getLogger(__name__)

__all__ = ["run_probe", "probe_features", "split_text"]


_LEGEND = {"ours": "encoder", "random_init": "random init", "pixels": "raw pixels"}


def _file_stem(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _check_label_names(names: list[str]) -> None:
    """Refuse labels that would share a metric name or a plot file (``view=AP`` and a column
    ``view_AP`` both become ``view_AP``): the second would silently overwrite the first's
    tracked metrics and ROC plot."""
    for what, key in (("MLflow metric name", metric_safe), ("plot file name", _file_stem)):
        seen: dict[str, str] = {}
        for name in names:
            other = seen.setdefault(key(name), name)
            if other != name or names.count(name) > 1:
                raise DatasetError(
                    f"labels {other!r} and {name!r} share the {what} {key(name)!r}: "
                    "give each label once, under names that differ in letters or digits"
                )


def probe_features(
    feats: np.ndarray, ds: Dataset, cfg: Config
) -> tuple[dict[str, Any], np.ndarray]:
    """Linear probe + retrieval numbers for one feature set; returns (summary, scores [N, L])."""
    p = cfg.probe
    res = cross_val_probe(
        feats,
        ds.labels,
        ds.groups,
        label_names=ds.label_names,
        c=p.logreg_c,
        folds=p.folds,
        split=p.split,
        test_fraction=p.test_fraction,
        bootstrap=p.bootstrap,
        seed=p.seed,
        seeds=p.seeds,
    )
    prec: dict[str, float | None] = {}
    mean_ap: dict[str, float | None] = {}
    knn: dict[str, float | None] = {}
    # precision@k and mAP count same-value hits, negatives among negatives too: a rare label
    # scores near 1 for any features, so each is reported beside its random-ranking level
    prec_chance: dict[str, float | None] = {}
    map_chance: dict[str, float | None] = {}
    # a label the probe skips (one class, a class in one patient) gets no retrieval
    # numbers either: they would be 1.0 or <= 0.5 whatever the features
    usable = [j for j in range(len(ds.label_names)) if retrieval_ok(ds.labels[:, j], ds.groups)]
    # one ranking of the images scores every label: ranking them per label and metric took
    # hours on a large set
    scored = retrieval_scores(feats, ds.labels[:, usable], ds.groups, p.knn_k, seed=p.seed)
    column = {j: i for i, j in enumerate(usable)}
    for j, name in enumerate(ds.label_names):
        i = column.get(j)
        if i is None:
            prec[name] = mean_ap[name] = knn[name] = prec_chance[name] = map_chance[name] = None
            continue
        prec[name] = float(scored.precision_at_k[i])
        mean_ap[name] = float(scored.mean_average_precision[i])
        knn[name] = float(scored.knn_auroc[i])
        prec_chance[name], map_chance[name] = retrieval_chance(ds.labels[:, j], ds.groups)
    summary = {**res.to_dict(), "precision_at_k": prec, "retrieval_map": mean_ap}
    summary.update(precision_at_k_chance=prec_chance, retrieval_map_chance=map_chance)
    return {**summary, "knn_auroc": knn}, res.scores


def split_text(p: ProbeConfig) -> str:
    """The report's words for ``cfg.probe``'s split. A holdout split is stratified on each
    label separately, so it is one split per label, not one for the report: two labels'
    AUROCs come from different held-out patients."""
    if p.split == "kfold":
        return f"{p.folds}-fold cross-validation grouped by patient (stratified)"
    return (
        "a patient-level split of its own for each label (stratified on that label), "
        f"{p.test_fraction:.0%} of patients held out"
    )


def _decode_settings(enc_cfg: Config) -> dict[str, Any]:
    """Decode arguments from the ingest settings saved with the checkpoint.

    Serving decodes uploads with these (``radjepa.inference.Preprocess``) and the encoder was
    trained on shards made with them; decoding with the probe command's own config (defaults
    without ``--config``) would measure, and fit the served head on, other pixels.
    """
    ing = enc_cfg.ingest
    return {
        "size": ing.image_size,
        "dtype": ing.dtype,
        "window_percentiles": tuple(ing.window_percentiles),
    }


def _shard_decode_settings(stored: dict[str, Any]) -> dict[str, Any]:
    """``stored_decode``'s record of how shards were made, in the keys of
    :func:`_decode_settings` (None where the shards do not say: mixed sizes, no window in
    their manifest), so report.json names the pixels scored the way it names a CSV's."""
    window = stored.get("ingest.window_percentiles")
    return {
        "size": stored.get("ingest.image_size"),
        "dtype": stored.get("ingest.dtype"),
        "window_percentiles": None if window is None else [float(v) for v in window],
    }


def _quarantines(enc_cfg: Config, cfg: Config, policy: str) -> bool:
    """Whether the probe refuses the images ingest's ``policy`` setting quarantines: as the
    checkpoint's ingest did, unless the probe's own config keeps them (an archive of scrubbed
    secondary captures, say)."""
    return all(getattr(c.ingest, policy) == "quarantine" for c in (enc_cfg, cfg))


def _segmentation(
    seg_csv: str | os.PathLike[str],
    seg_data: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    structures: Sequence[str],
    encoders: dict[str, Any],
    cfg: Config,
    device: Any,
    group_col: str | None,
) -> dict[str, Any]:
    """Held-out Dice per structure for each encoder, on the same patient-level split
    (``seg_data``: ``load_seg_csv``'s images, masks and patient ids)."""
    images, masks, groups = seg_data
    methods = {}
    for name, enc in encoders.items():
        tokens = extract_features(
            enc, images, batch_size=cfg.probe.batch_size, device=device, patch_tokens=True
        )  # [N, T, D]
        try:
            res = seg_probe(
                tokens_to_grid(tokens),
                masks,
                structures=structures,
                groups=groups,
                seed=cfg.probe.seed,
            )
        except ValueError as err:  # too few images or patients to hold any out
            raise DatasetError(f"{seg_csv}: {err}") from None
        methods[name] = res.to_dict()
        log.info("segmentation %s: %s", name, res.dice)
    return {
        "csv": str(seg_csv),
        "structures": list(structures),
        "grouped_by": group_col if groups is not None else None,
        "group_col": group_col,  # the column asked for, which the report names when absent
        "methods": methods,
    }


def run_probe(
    checkpoint: str | os.PathLike[str],
    csv: str | os.PathLike[str] | None,
    labels: Sequence[str | LabelSpec],
    out_dir: str | os.PathLike[str],
    cfg: Config,
    *,
    shards: str | os.PathLike[str] | None = None,
    device: str | None = None,
    image_col: str = "image",
    group_col: str | None = None,
    limit: int | None = None,
    pca_images: int = 4,
    seg_csv: str | os.PathLike[str] | None = None,
    structures: Sequence[str] = (),
    seg_group_col: str | None = None,
) -> dict[str, Any]:
    """Probe a checkpoint on a labels CSV; write report.json/.md, ROC/PCA PNGs and ``head/``.

    Images come from ``csv`` or, with ``csv=None``, from ingested ``shards`` (labels from
    their metadata columns). ``group_col`` names the patient column: by default
    ``patient_id`` in a CSV and ``patient_pid`` in shards (the column ingest writes); ``""``
    makes each image its own patient. Returns the report dict (also
    written as ``report.json``). The head is fitted on every image with the encoder's
    features, for serving; the reported numbers are out-of-fold. With ``seg_csv`` (image +
    one mask column per name in ``structures``) a segmentation probe runs on the encoder and
    on the random-init baseline, and the report gains held-out Dice per structure, split by
    the mask CSV's ``seg_group_col`` (by default ``group_col`` beside a labels CSV, else
    ``patient_id``).
    """
    from radjepa.checkpoint import CheckpointError, load_encoder, read_meta
    from radjepa.training_data import decode_mismatch, stored_decode

    t0 = time.perf_counter()
    out = Path(out_dir)
    # nothing is written until the end, and then into a fresh folder that replaces `out`
    # whole (radjepa.eval.outdir); a folder that is not an earlier probe's is refused now,
    # before the work, not after it
    check_out_dir(out)
    p = cfg.probe
    dev = resolve_device(device)
    if (csv is None) == (shards is None):
        raise DatasetError("give exactly one source of labelled images: a CSV or shards")
    if group_col is None:  # each source's own name: shards have no patient_id column
        group_col = "patient_id" if csv is not None else "patient_pid"
    if limit is not None and limit < 1:
        raise DatasetError(f"limit {limit}: use at least 1 image (or no limit)")
    _check_label_names([parse_label_spec(s).name for s in labels])
    encoder, enc_cfg = load_encoder(checkpoint, which=p.encoder, map_location="cpu")
    if p.encoder != "target":
        log.warning(
            "probe.encoder=%s: the head will be fitted on features `radjepa serve` does not "
            "produce (it serves the target encoder) and will be refused there; use "
            "probe.encoder=target for a deployable head",
            p.encoder,
        )
    decode = _decode_settings(enc_cfg)
    shards_decode: dict[str, Any] | None = None
    mismatch: str | None = None
    if csv is not None:
        ds = load_csv_dataset(
            csv,
            image_col=image_col,
            label_cols=labels,
            group_col=group_col,
            limit=limit,
            # refused when ingest refused them for this checkpoint and the probe's own
            # config (--set ingest.burned_in_annotation=keep) does not let them through
            reject_burned_in=_quarantines(enc_cfg, cfg, "burned_in_annotation"),
            reject_for_processing=_quarantines(enc_cfg, cfg, "for_processing"),
            **decode,
        )
    else:
        ds = load_shard_dataset(shards, labels, group_col or None, limit=limit)
        shards_decode = _shard_decode_settings(stored_decode(str(shards)))
        mismatch = decode_mismatch(str(shards), enc_cfg)
        if mismatch:  # the head is fitted on these pixels, and served on the others
            log.warning(
                "%s: the scores and the head are of pixels made otherwise than the uploads "
                "the served head will see",
                mismatch,
            )
    n_patients = len(np.unique(ds.groups))
    if n_patients < 2:
        # every metric here compares patients with other patients (folds, neighbours)
        # not the id itself: an MRN, or for an image without one its absolute path, and
        # hospital file names often carry patient names (the message reaches a console, a
        # Ray job's log)
        n = len(ds.images)
        if n == 1:
            what = "only 1 image"
        elif group_col:
            what = f"all {n} images have the same {group_col!r} (one patient)"
        else:
            what = f"all {n} images count as one patient"
        raise DatasetError(
            f"{what}: patient-grouped evaluation needs images of at least 2 patients"
        )
    # read before any feature is extracted or file written: a bad mask CSV found after the
    # probe had overwritten the head and plots of an earlier run in --out, report kept
    # the mask CSV's patient column: as the labels CSV's, or patient_id beside shards (whose
    # patient_pid a mask CSV does not have: its patients were split image by image)
    seg_group_col = seg_group_col or (group_col if csv is not None else "patient_id")
    seg_data = (
        load_seg_csv(seg_csv, structures, group_col=seg_group_col, **decode)
        if seg_csv is not None
        else None
    )
    log.info(
        "probe set: %d images, %d patients, labels %s",
        len(ds.images),
        n_patients,
        ds.label_names,
    )
    meta = read_meta(checkpoint)
    enc_info = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "which": p.encoder,
        "step": meta.get("step"),
        "sha256": checkpoint_fingerprint(checkpoint),
        "arch": enc_cfg.model.arch,
        "img_size": enc_cfg.model.img_size,
        "patch_size": enc_cfg.model.patch_size,
        "embed_dim": int(encoder.embed_dim),
        # what serving needs to check a head against a model without re-reading the checkpoint
        "meta": {k: meta.get(k) for k in ("format_version", "model", "value_contract", "extra")},
    }

    def embed(enc: Any) -> np.ndarray:
        return extract_features(enc, ds.images, batch_size=p.batch_size, device=dev)

    ours = embed(encoder)
    try:
        require_finite(ours)
    except ValueError as err:  # the baselines are finite by construction: the weights are not
        raise CheckpointError(
            f"{checkpoint}: the {p.encoder} encoder gives NaN/inf features ({err}); the "
            "run that wrote it has likely diverged: probe an earlier checkpoint"
        ) from None
    random_encoder = random_init_encoder(enc_cfg, seed=p.seed)
    feature_sets = {
        "ours": ours,
        "random_init": embed(random_encoder),
        "pixels": pixel_features(ds.images, p.pixel_baseline_size),
    }
    methods: dict[str, Any] = {}
    scores: dict[str, np.ndarray] = {}
    for name, feats in feature_sets.items():
        methods[name], scores[name] = probe_features(feats, ds, cfg)
        log.info(
            "%s: %s",
            name,
            {lab["name"]: (lab["auroc"] or {}).get("estimate") for lab in methods[name]["labels"]},
        )
    comparisons = compare_methods(
        methods,
        scores,
        ds.labels,
        ds.groups,
        ds.label_names,
        reference="ours",
        draws=p.bootstrap,
        seed=p.seed,
    )

    segmentation = None  # before the plots and head: it can still refuse its input
    if seg_data is not None and seg_csv is not None:
        segmentation = _segmentation(
            seg_csv,
            seg_data,
            structures,
            {"ours": encoder, "random_init": random_encoder},
            cfg,
            dev,
            seg_group_col,
        )

    roc_curves: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(ds.label_names):
        curves = {}
        for method, s in scores.items():
            lab = methods[method]["labels"][j]
            ok = np.isfinite(s[:, j])
            if lab["auroc"] is not None and ok.any():
                curves[_LEGEND.get(method, method)] = (
                    ds.labels[ok, j],
                    s[ok, j],
                    lab["auroc"]["estimate"],
                )
        if curves:
            roc_curves[name] = curves
    n_pca = min(pca_images, len(ds.images))
    pca_tokens = extract_features(
        encoder, ds.images[:n_pca], batch_size=p.batch_size, device=dev, patch_tokens=True
    )  # [n, T, D]
    head = None
    probeable = [j for j, lab in enumerate(methods["ours"]["labels"]) if lab["skipped"] is None]
    if probeable:
        head = fit_head(
            feature_sets["ours"],
            ds.labels[:, probeable],
            label_names=[ds.label_names[j] for j in probeable],
            positive=[ds.positive[j] for j in probeable],
            c=p.logreg_c,
            seed=p.seed,
            encoder=enc_info,
        )
    # the report names the files where they will be once the staged folder replaces `out`
    roc_files = {name: Path("plots") / f"roc_{_file_stem(name)}.png" for name in roc_curves}
    pca_file = Path("plots") / "pca_patch_features.png"
    plots: dict[str, Any] = {
        "roc": {name: str(out / f) for name, f in roc_files.items()},
        "pca": str(out / pca_file),
    }
    head_dir = str(out / "head") if head is not None else None
    report = {
        "checkpoint": str(checkpoint),
        "encoder": enc_info,
        "data": {
            "csv": str(csv) if csv is not None else None,
            "shards": str(shards) if shards is not None else None,
            "n_images": int(len(ds.images)),
            "n_patients": int(len(np.unique(ds.groups))),
            "rejected": ds.rejected,
            # how CSV images (labels and segmentation) were decoded, and how the served head
            # decodes uploads: the checkpoint's ingest settings
            "decode": {**decode, "window_percentiles": list(decode["window_percentiles"])},
            # shards come decoded: how ingest made the pixels scored here (None: unrecorded),
            # and in words how that differs from ``decode``
            "shards_decode": shards_decode,
            "decode_mismatch": mismatch,
            "labels": [
                {"name": n, "positive": pos, "n_pos": int(ds.labels[:, j].sum())}
                for j, (n, pos) in enumerate(zip(ds.label_names, ds.positive, strict=True))
            ],
        },
        "protocol": {
            "pooling": f"{p.encoder} encoder, mean of patch tokens",
            "C": p.logreg_c,
            "split": p.split,
            "folds": p.folds,
            "test_fraction": p.test_fraction,
            "split_text": split_text(p),
            "bootstrap": p.bootstrap,
            "seed": p.seed,
            "seeds": p.seeds,
            "knn_k": p.knn_k,
            "pixel_size": p.pixel_baseline_size,
        },
        "methods": methods,
        "comparisons": comparisons,
        "plots": plots,
        "head": head_dir,
        "segmentation": segmentation,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    with staged_out_dir(out) as tmp:
        for name, curves in roc_curves.items():
            plot_roc(name, curves, tmp / roc_files[name])
        plot_pca_map(ds.images[:n_pca], tokens_to_grid(pca_tokens), tmp / pca_file)
        if head is not None:
            save_head(tmp / "head", head)
        write_report(report, tmp, links_from=out)
    report["files"] = {"json": str(out / "report.json"), "markdown": str(out / "report.md")}
    if head is not None:  # where it is now: it was written into the staging folder
        log.info(
            "probe head (%d labels, dim %d) saved to %s (for `radjepa serve --head`)",
            len(head.label_names),
            head.feature_dim,
            head_dir,
        )
    log.info("probe report written to %s", report["files"]["markdown"])
    return report
