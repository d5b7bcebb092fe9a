"""The probe report: ``report.json`` (machine-readable) and ``report.md`` (for people).

One table per label compares the encoder with both baselines on the same folds, so a reader
sees at a glance whether pretraining bought anything over random weights or raw pixels; a
second gives the encoder minus each baseline with a paired interval, which is what decides
whether the gap is more than the choice of patients.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from radjepa.eval.metrics import MIN_CLASS_PATIENTS

__all__ = [
    "METHOD_TITLES",
    "diff_marks",
    "flat_metrics",
    "fmt3",
    "metric_safe",
    "render_markdown",
    "write_report",
]

METHOD_TITLES = {
    "ours": "encoder (frozen)",
    "random_init": "same architecture, random init",
    "pixels": "logistic regression on pixels",
}


def metric_safe(name: str) -> str:
    """MLflow metric names allow [A-Za-z0-9_-. :/]; ``view=AP`` becomes ``view_AP``."""
    return re.sub(r"[^A-Za-z0-9_.\- :/]", "_", name)


_PARTS = (("estimate", ""), ("low", "_ci_low"), ("high", "_ci_high"))
_DIFF_PARTS = (
    ("excludes_zero", "_excludes_zero"),
    ("p_value", "_p"),
    ("p_holm", "_p_holm"),
    ("holds_adjusted", "_holds_adjusted"),
    ("interval_reliable", "_interval_reliable"),
)
_RETRIEVAL = (
    "precision_at_k",
    "precision_at_k_chance",
    "retrieval_map",
    "retrieval_map_chance",
    "knn_auroc",
)
_SPREAD = (("mean", "_seed_mean"), ("std", "_seed_std"), ("min", "_seed_min"), ("max", "_seed_max"))


def _put(out: dict[str, float], key: str, d: dict[str, Any] | None, parts: Any) -> None:
    """Copy the finite numbers ``d[part]`` to ``out[key + suffix]``."""
    for part, suffix in parts:
        v = (d or {}).get(part)
        if isinstance(v, bool):
            out[f"{key}{suffix}"] = float(v)
        elif v is not None and math.isfinite(v):
            out[f"{key}{suffix}"] = float(v)


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``{"ours/view_AP/auroc": 0.93, ...}``: every finite number worth a tracking metric.

    Paired differences go under ``<reference>_vs_<baseline>/<label>/auroc_diff`` (+ ``_ci_low``,
    ``_ci_high``, ``_excludes_zero`` as 1/0, ``_p``, ``_p_holm``, ``_holds_adjusted``,
    ``_interval_reliable``), spreads over probe seeds under ``.../auroc_seed_mean``
    (``_seed_std``, ``_seed_min``, ``_seed_max``). Retrieval numbers come with their chance
    levels (``precision_at_k_chance``, ``retrieval_map_chance``); a structure no held-out image
    shows has no Dice to log.
    """
    out: dict[str, float] = {}
    for method, res in report.get("methods", {}).items():
        for lab in res.get("labels", []):
            key = f"{method}/{metric_safe(lab['name'])}"
            for metric in ("auroc", "auprc"):
                _put(out, f"{key}/{metric}", lab.get(metric), _PARTS)
                _put(out, f"{key}/{metric}", (lab.get("seeds") or {}).get(metric), _SPREAD)
        for kind in _RETRIEVAL:
            for label, v in (res.get(kind) or {}).items():
                if v is not None and math.isfinite(v):
                    out[f"{method}/{metric_safe(label)}/{kind}"] = float(v)
    comp = report.get("comparisons") or {}
    for other, res in (comp.get("methods") or {}).items():
        for row in res["labels"]:
            key = f"{comp['reference']}_vs_{other}/{metric_safe(row['name'])}"
            for metric in ("auroc_diff", "auprc_diff"):
                parts = (*_PARTS, *_DIFF_PARTS)
                _put(out, f"{key}/{metric}", row.get(metric), parts)
                _put(out, f"{key}/{metric}", (row.get("seeds") or {}).get(metric), _SPREAD)
    seg = report.get("segmentation") or {}
    for method, res in (seg.get("methods") or {}).items():
        for name, v in res["dice"].items():
            if v is not None and math.isfinite(v):
                out[f"{method}/seg_{metric_safe(name)}/dice"] = float(v)
    return out


def fmt3(v: float, signed: bool = False) -> str:
    """``v`` to 3 decimals (``+``/``-`` with ``signed``); a value that rounds to zero is
    ``0.000``: ``-0.000`` (a bound of -0.0004) reads as a negative number that is not there,
    and ``+0.000`` as a gain."""
    text = f"{v:+.3f}" if signed else f"{v:.3f}"
    return "0.000" if float(text) == 0 else text


def _fmt(iv: dict[str, Any] | None) -> str:
    if iv is None:
        return "-"
    est, lo, hi = iv["estimate"], iv["low"], iv["high"]
    if lo is None or not math.isfinite(lo):
        return fmt3(est)
    return f"{fmt3(est)} [{fmt3(lo)}, {fmt3(hi)}]"


def _num(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else fmt3(v)


def diff_marks(d: dict[str, Any]) -> str:
    """`` *`` when the interval excludes 0, `` *†`` when the difference also holds after
    Holm's correction over the baseline's labels (``p_holm`` below the level's alpha) and the
    label has enough patients in each class for its interval to be read as 95%
    (``interval_reliable``): with a handful, the bootstrap covers far less and a † would claim
    more than the data show."""
    star = " *" if d.get("excludes_zero") else ""
    holds = d.get("holds_adjusted") and d.get("interval_reliable") is not False
    return star + ("†" if star and holds else "")


def _fmt_diff(d: dict[str, Any] | None) -> str:
    """``+0.052 [+0.010, +0.094] *†``: signed, marked as ``diff_marks`` says."""
    if d is None:
        return "-"
    est, lo, hi = d["estimate"], d["low"], d["high"]
    if lo is None or not math.isfinite(lo):
        return fmt3(est, signed=True)
    return f"{fmt3(est, True)} [{fmt3(lo, True)}, {fmt3(hi, True)}]{diff_marks(d)}"


def _fmt_spread(d: dict[str, Any] | None, signed: bool = False) -> str:
    """``0.850 ± 0.004 (min 0.845, max 0.856)``: the point estimates over the probe seeds."""
    if d is None or d.get("mean") is None or not math.isfinite(d["mean"]):
        return "-"
    sd = f" ± {fmt3(d['std'])}" if d.get("std") is not None and math.isfinite(d["std"]) else ""
    mean, lo, hi = (fmt3(d[k], signed) for k in ("mean", "min", "max"))
    return f"{mean}{sd} (min {lo}, max {hi})"


def render_markdown(report: dict[str, Any], out_dir: str | os.PathLike[str] | None = None) -> str:
    """The Markdown page; plot paths are made relative to ``out_dir`` so the folder can move."""
    root = Path(out_dir) if out_dir is not None else None

    def rel(p: str) -> str:
        return os.path.relpath(p, root) if root is not None else p

    proto, data, enc = report["protocol"], report["data"], report["encoder"]
    lines = [
        "# RadJEPA probe report",
        "",
        f"- checkpoint: `{report['checkpoint']}` ({enc.get('which')} encoder, step "
        f"{enc.get('step')}, {enc.get('arch')}, dim {enc.get('embed_dim')}, sha256 "
        f"`{str(enc.get('sha256', ''))[:12]}`)",
        f"- data: `{data['csv'] or data['shards']}`: {data['n_images']} images, "
        f"{data['n_patients']} patients, "
        f"{len(data['rejected'])} left out (listed below)",
        *_decode_mismatch(data),
        f"- protocol: {proto['pooling']}; standardised logistic regression C={proto['C']}; "
        f"{proto['split_text']}{_pooled(proto)}; {proto['bootstrap']} patient-level bootstrap "
        "draws, "
        f"percentile 95% CI{_seeds_text(proto)}; kNN k={proto['knn_k']} (cosine, other "
        "patients only); pixel "
        f"baseline {proto['pixel_size']}x{proto['pixel_size']}",
        *_too_few_draws(report.get("comparisons"), proto.get("bootstrap") or 0),
        "",
    ]
    labels = [lab["name"] for lab in report["methods"]["ours"]["labels"]]
    for i, name in enumerate(labels):
        info = data["labels"][i]
        pos = f" (positive: {info['positive']})" if info.get("positive") else ""
        # the protocol line names probe.folds; a rare label is cross-validated with fewer
        ours = report["methods"]["ours"]["labels"][i]
        folds = ours.get("folds") or 0
        fewer = (
            f" {folds}-fold, not {proto['folds']}-fold: the rarer class has only {folds} patients."
            if proto.get("split") == "kfold" and 0 < folds < proto.get("folds", folds)
            else ""
        )
        seeds = ours.get("seeds")
        seed_head = (
            f" AUROC over {len(seeds['seeds'])} seeds | AUPRC over {len(seeds['seeds'])} seeds |"
            if seeds
            else ""
        )
        lines += [
            f"## {name}{pos}",
            "",
            f"{info['n_pos']} positive of {data['n_images']} images.{fewer}{_chance(ours)}",
            *_bootstrap_lines(report["methods"], i, proto.get("bootstrap") or 0),
            "",
            "| features | AUROC [95% CI] | AUPRC [95% CI] |"
            + seed_head
            + " precision@k | p@k chance | mAP | mAP chance | kNN AUROC |",
            "|---|---|---|" + ("---|---|" if seeds else "") + "---|---|---|---|---|",
        ]
        skipped = None
        for method, res in report["methods"].items():
            lab = res["labels"][i]
            skipped = skipped or lab.get("skipped")
            spread_cells = (
                f" {_fmt_spread((lab.get('seeds') or {}).get('auroc'))} | "
                f"{_fmt_spread((lab.get('seeds') or {}).get('auprc'))} |"
                if seeds
                else ""
            )
            lines.append(
                f"| {METHOD_TITLES.get(method, method)} | {_fmt(lab['auroc'])} | "
                f"{_fmt(lab['auprc'])} |{spread_cells} "
                f"{_num(res['precision_at_k'].get(name))} | "
                f"{_num((res.get('precision_at_k_chance') or {}).get(name))} | "
                f"{_num((res.get('retrieval_map') or {}).get(name))} | "
                f"{_num((res.get('retrieval_map_chance') or {}).get(name))} | "
                f"{_num(res['knn_auroc'].get(name))} |"
            )
        lines += _difference_table(report.get("comparisons"), i)
        if skipped:
            lines += ["", f"Not probed: {skipped}."]
        roc = report.get("plots", {}).get("roc", {}).get(name)
        if roc:
            lines += ["", f"![ROC {name}]({rel(roc)})"]
        lines.append("")
    pca = report.get("plots", {}).get("pca")
    if pca:
        lines += ["## Patch features (PCA 1-3 as RGB)", "", f"![PCA map]({rel(pca)})", ""]
    if report.get("segmentation"):
        lines += _segmentation_lines(report["segmentation"])
    if report.get("head"):
        lines += [f"Probe head (all images, encoder features): `{rel(report['head'])}`", ""]
    if data["rejected"]:
        lines += ["## Images left out", ""]
        lines += [f"- {_where(r)}: {r['reason']}" for r in data["rejected"]]
        lines.append("")
    return "\n".join(lines)


def _difference_table(comp: dict[str, Any] | None, i: int) -> list[str]:
    """Label ``i``'s paired differences (reference minus each baseline) as Markdown lines."""
    rows = [(m, res["labels"][i]) for m, res in ((comp or {}).get("methods") or {}).items()]
    rows = [(m, row) for m, row in rows if row.get("auroc_diff") is not None]
    if not comp or not rows:
        return []
    ref = METHOD_TITLES.get(comp["reference"], comp["reference"])
    pct = f"{100 * comp.get('level', 0.95):g}%"
    seeded = [row["seeds"] for _, row in rows if row.get("seeds")]
    n_seeds = f" over {len(seeded[0]['seeds'])} seeds" if seeded else ""
    lines = [
        "",
        f"Paired difference, {ref} minus each baseline (same images, folds and bootstrap "
        f"patients; * = the {pct} interval excludes 0; † = it still holds after Holm's "
        "correction over the baseline's labels, given only where each class has at least "
        f"{MIN_CLASS_PATIENTS} patients):",
        "",
        f"| {ref} minus | ΔAUROC [{pct} CI] | ΔAUPRC [{pct} CI] |"
        + (f" ΔAUROC{n_seeds} | ΔAUPRC{n_seeds} |" if seeded else ""),
        "|---|---|---|" + ("---|---|" if seeded else ""),
    ]
    for method, row in rows:
        cells = f"| {METHOD_TITLES.get(method, method)} | {_fmt_diff(row['auroc_diff'])} | "
        cells += f"{_fmt_diff(row['auprc_diff'])} |"
        if seeded:
            sd = row.get("seeds") or {}
            cells += f" {_fmt_spread(sd.get('auroc_diff'), signed=True)} | "
            cells += f"{_fmt_spread(sd.get('auprc_diff'), signed=True)} |"
        lines.append(cells)
    return lines


def _too_few_draws(comp: dict[str, Any] | None, requested: int) -> list[str]:
    """A line when a family (one baseline, one metric) can hold no difference after Holm's
    correction: a difference's smallest p-value is 2 / (d + 1) for its d *counted* draws
    (draws whose patients hold one class are dropped, so d can fall short of the requested
    number), and the best-ranked of the family's m labels must reach alpha / m."""
    comp = comp or {}
    alpha = 1 - comp.get("level", 0.95)
    families, blocked = 0, []
    for other, per_metric in ((comp.get("correction") or {}).get("sizes") or {}).items():
        rows = ((comp.get("methods") or {}).get(other) or {}).get("labels") or []
        for metric, m in per_metric.items():
            counted = [
                r[metric]["draws"]
                for r in rows
                if r.get(metric) and r[metric].get("p_value") is not None
            ]
            if not m or not counted:
                continue
            families += 1
            if 2 * m / (max(counted) + 1) >= alpha:
                blocked.append((2 * m / (max(counted) + 1), max(counted), m, other, metric))
    if not blocked:
        return []
    _, best, m, *_ = max(blocked)  # the family furthest from holding anything
    scope = ""
    if len(blocked) < families:
        scope = " " + ", ".join(
            f"against {METHOD_TITLES.get(o, o)} ({'ΔAUROC' if k == 'auroc_diff' else 'ΔAUPRC'})"
            for *_, o, k in blocked
        )
    need = math.ceil(2 * m / alpha)  # counted draws it takes
    if best < requested:  # as many more requested as the dropped share eats
        need = math.ceil(need * requested / max(best, 1))
    drawn = (
        f"{best} bootstrap draws"
        if best >= requested
        else f"{best} counted of {requested} bootstrap draws (draws whose patients hold one "
        "class are dropped)"
    )
    return [
        f"- with {drawn} no paired difference{scope} can hold after Holm's correction "
        f"over {m} label{'s' if m != 1 else ''} (the smallest p-value is 2/{best + 1}); "
        f"set probe.bootstrap={need} or more for that test"
    ]


def _bootstrap_lines(methods: dict[str, Any], i: int, requested: int) -> list[str]:
    """Label ``i``'s counted bootstrap draws beside the requested ones, and a warning when a
    class has fewer than ``MIN_CLASS_PATIENTS`` scored patients: the percentile interval then
    covers far less than 95% (a few patients make few distinct resamples)."""
    labs = {m: res["labels"][i] for m, res in methods.items()}
    counted = {m: lab["auroc"]["draws"] for m, lab in labs.items() if lab.get("auroc")}
    if requested <= 0 or not counted:
        return []
    if len(set(counted.values())) == 1:
        text = f"{next(iter(counted.values()))} of {requested} bootstrap draws counted"
    else:
        each = ", ".join(f"{METHOD_TITLES.get(m, m)} {n}" for m, n in counted.items())
        text = f"Bootstrap draws counted of {requested}: {each}"
    lines = ["", f"{text} (draws whose patients hold one class are dropped)."]
    ref = next(iter(labs.values()))
    if ref.get("interval_reliable") is False:
        pos, neg = ref.get("n_scored_pos_patients"), ref.get("n_scored_neg_patients")
        lines += [
            "",
            f"**Unreliable interval**: the scored images hold {pos} positive and {neg} negative "
            f"patients, fewer than {MIN_CLASS_PATIENTS} in a class; the patient bootstrap then "
            "covers far less than 95%, so its intervals are too narrow, and no difference for "
            "this label is marked †.",
        ]
    return lines


def _segmentation_lines(seg: dict[str, Any]) -> list[str]:
    """The segmentation section: how its split was grouped, and Dice per structure beside the
    number of held-out images showing it (none: no Dice, not a 0 or 1 that reads as one)."""
    methods = seg["methods"]
    first = next(iter(methods.values()))
    if seg.get("grouped_by"):
        split = f"split by patient (the `{seg['grouped_by']}` column)"
    elif seg.get("group_col"):
        split = f"each image its own patient: the mask CSV has no `{seg['group_col']}` column"
    else:
        split = "each image its own patient: no patient column was given"
    lines = [
        "## Segmentation probe (held-out Dice)",
        "",
        f"`{seg['csv']}`: {first['n_train']} training / {first['n_test']} held-out images, "
        f"{split}; 1x1 conv on frozen patch tokens, bilinear upsampling.",
        "",
        "| structure | held-out images with it | "
        + " | ".join(METHOD_TITLES.get(m, m) for m in methods)
        + " | all-foreground |",
        "|---|---|" + "---|" * (len(methods) + 1),
    ]
    present = first.get("n_test_present") or {}
    for st in seg["structures"]:
        n_img = present.get(st)
        dices = [res["dice"][st] for res in methods.values()] + [first["trivial_dice"][st]]
        absent = n_img == 0
        cells = " | ".join("absent from the held-out images" if absent else _num(d) for d in dices)
        lines.append(f"| {st} | {'-' if n_img is None else n_img} | {cells} |")
    lines.append("")
    return lines


def _seeds_text(proto: dict[str, Any]) -> str:
    """Name the fold seeds behind the spread columns (nothing with the default one seed)."""
    n, seed = proto.get("seeds") or 1, proto.get("seed", 0)
    if n <= 1:
        return ""
    return (
        f"; linear probe repeated with fold seeds {seed}-{seed + n - 1} (estimates and "
        f"intervals from seed {seed}, mean ± sd and range over all {n} beside them)"
    )


def _pooled(proto: dict[str, Any]) -> str:
    """Say how k-fold numbers are formed: one AUROC over every image's out-of-fold score,
    which differs from (and is not) the mean of per-fold AUROCs a reader may assume."""
    if proto.get("split") != "kfold":
        return ""
    return "; AUROC/AUPRC pooled over all out-of-fold predictions (not a mean of per-fold values)"


def _chance(label: dict[str, Any]) -> str:
    """AUPRC's chance level: a random ranking's expected AP over the images it was computed
    on (for a holdout split the held-out patients' images, not the whole set). Their
    prevalence is printed beside it because readers expect it there, and it sits below the
    chance level: reading AUPRC against it overstates what the probe found."""
    base, n = label.get("auprc_baseline"), label.get("n_scored") or 0
    if base is None or not math.isfinite(base) or not n:
        return ""
    where = f"all {n} images" if n == label.get("n") else f"the {n} held-out images"
    prev = label.get("scored_prevalence")
    prev_text = f"; their prevalence {prev:.3f}" if prev is not None and math.isfinite(prev) else ""
    return (
        f" AUPRC chance level {base:.3f} (a random ranking's expected AP over {where}, "
        f"as scored{prev_text})."
    )


def _decode_mismatch(data: dict[str, Any]) -> list[str]:
    """The line saying the shards probed were made otherwise than the served head decodes
    uploads (none when they agree): the numbers are of those pixels, not of the uploads'."""
    mismatch = data.get("decode_mismatch")
    if not mismatch:
        return []
    return [
        f"- **decode mismatch**: {mismatch}; the scores and the head are of the shards' pixels, "
        "not of the uploads the served head will see"
    ]


def _where(rejected: dict[str, str]) -> str:
    """A left-out image by CSV row (decoder rejects) or by image id (shard rows): never by
    file name, which in hospital archives often carries the patient's name."""
    if "row" in rejected:
        return f"CSV row {rejected['row']}"
    return f"image `{rejected['image_id'][:16]}`"


def _finite(obj: Any) -> Any:
    """NaN/inf become null so report.json is strict JSON any reader accepts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_report(
    report: dict[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    links_from: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; returns both paths.

    ``links_from`` is the folder the report's paths name, when ``out_dir`` is only where it
    is staged (``run_probe`` writes into a temporary folder that then replaces ``--out``):
    the Markdown links are made relative to it, so they hold after the swap.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "report.json"
    js.write_text(json.dumps(_finite(report), indent=2, allow_nan=False, default=str) + "\n")
    md = out / "report.md"
    md.write_text(render_markdown(report, out if links_from is None else links_from))
    return js, md
