"""The one configuration schema shared by the CLI, Ray jobs, Tune sweeps and Serve.

Every job receives the same :class:`Config` object. It is loaded from YAML (``configs/*.yaml``)
and overridden with dotted keys (``masks.num_targets=4``), the same keys a Tune search space
addresses. Validation happens here, before any cluster work starts, and every error names the
offending dotted key so a typo in a 300-trial sweep fails in a second, not after an hour.
"""

from __future__ import annotations

import datetime
import logging
import os
import posixpath
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "Config",
    "ConfigError",
    "check_registry_name",
    "load_config",
    "apply_overrides",
    "parse_override",
    "config_to_yaml",
    "flatten",
    "MODEL_WIDTHS",
    "CompileScope",
    "PatientIdentity",
]

# Encoder sizes (embed dim, depth, heads) as in the ViT/I-JEPA papers; "tiny" is for CPU tests.
MODEL_WIDTHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}

Range = tuple[float, float]

# What ``train.compile`` compiles (see ``radjepa.engine.Pretrainer.compile``).
CompileScope = Literal["modules", "blocks"]

# What a patient pseudonym covers (``radjepa.imaging.deid.PATIENT_IDENTITIES``, which a test
# keeps equal to this; spelled out here so loading a config does not import the decoder).
PatientIdentity = Literal["patient_id", "issuer_and_patient_id"]


log = logging.getLogger(__name__)

# Seeds reach numpy (non-negative only), scikit-learn (below 2**32) and torch generators (a
# pretraining worker seeds one with seed * 1_000_003 + ..., which must stay below 2**64): a seed
# outside this range validated, then failed a sweep with a traceback or silently skipped every
# probe label.
SEED_MAX = 2**32 - 1


class ConfigError(ValueError):
    """A configuration problem, always phrased with the dotted key it concerns."""


def _takes_bool(annotation: Any) -> bool:
    """Whether a field's type admits a boolean; a number field does not (pydantic's lax mode
    would read ``true`` as 1, so ``--set train.steps=true`` trained for one step)."""
    if annotation is bool:
        return True
    if get_origin(annotation) is Annotated:  # its constraints are no types: the type is first
        return _takes_bool(get_args(annotation)[0])
    args = get_args(annotation)
    if not args:
        return annotation not in (int, float)
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in args)
    return any(_takes_bool(a) for a in args if a not in (Ellipsis, type(None)))


def _no_bool_for_numbers(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    field = cls.model_fields.get(info.field_name or "")
    if field is None or _takes_bool(field.annotation):
        return value
    items = value if isinstance(value, list | tuple) else [value]
    if any(isinstance(v, bool) for v in items):
        raise ValueError(f"expected a number, got the boolean {value!r}")
    return value


def _text_annotation(annotation: Any) -> tuple[bool, bool]:
    """(is a text field, also takes null): ``str`` or ``str | None``, not a Literal."""
    if annotation is str:
        return True, False
    args = get_args(annotation)
    if get_origin(annotation) is not Literal and str in args and set(args) <= {str, type(None)}:
        return True, type(None) in args
    return False, False


def _text_as_typed(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A YAML file reads ``run_name: 2025-01-15`` as a date and ``name: 123`` as a number, which
    a text field refused, while ``--set`` keeps both as the text typed (:func:`_override_item`):
    a text field takes such scalars as their text, so a file and ``--set`` agree."""
    field = cls.model_fields.get(info.field_name or "")
    if field is None or not _text_annotation(field.annotation)[0] or isinstance(value, bool):
        return value
    if isinstance(value, int | float | datetime.date):
        return str(value)
    return value


class _Section(BaseModel):
    # inf/nan validated (a YAML .inf, .nan) and failed far later: an OverflowError drawing masks
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    _no_bools = field_validator("*", mode="before")(classmethod(_no_bool_for_numbers))
    _text = field_validator("*", mode="before")(classmethod(_text_as_typed))


def _gpu_setting(value: Any) -> Any:
    """``--set train.use_gpu=true`` arrives as a YAML boolean; store the canonical string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _ordered(r: Range, name: str) -> Range:
    if r[0] > r[1]:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {r}")
    return r


class IngestConfig(_Section):
    """How raw archives become training shards (see ``radjepa.imaging`` for the value contract)."""

    image_size: int = Field(256, ge=32, le=4096, description="stored square size in pixels")
    dtype: Literal["uint8", "uint16"] = "uint8"
    window_percentiles: Range = Field(
        (0.5, 99.5), description="robust window used when a DICOM has no VOI LUT/window"
    )
    shard_rows: int = Field(2048, ge=1, description="images per Parquet shard")
    max_file_mb: float = Field(512.0, gt=0, description="larger inputs are quarantined")
    secret_env: str = Field(
        "RADJEPA_DEID_SECRET", description="env var holding the pseudonymisation HMAC key"
    )
    allow_development_key: bool = Field(
        False,
        description="with secret_env unset, pseudonymise (and key image ids) with the PUBLIC "
        "development key instead of refusing to start: for the bundled sample and tests only, "
        "never for patient data; ingest and serve both read it",
    )
    patient_identity: PatientIdentity = Field(
        "patient_id",
        description="what the patient pseudonym covers: 'patient_id' (PatientID alone, as "
        "before) or 'issuer_and_patient_id' (IssuerOfPatientID and its qualifiers with the "
        "PatientID, for archives pooled from several sites whose ids may collide); fixed per "
        "destination",
    )
    keep_source_paths: bool = Field(
        False, description="store raw source paths (PHI risk); otherwise only a keyed hash"
    )
    decode_actors: int = Field(
        0, ge=0, description="most decoder actors (grown on demand); 0 = one per cluster CPU"
    )
    decode_timeout_s: float = Field(
        300.0,
        ge=0,
        description="a file whose decode runs longer (a codec stuck on it, which held the run "
        "for ever) has its decode process ended and is quarantined as decode_timeout; "
        "0: no limit",
    )
    for_processing: Literal["quarantine", "keep"] = Field(
        "quarantine",
        description="DX, MG and IO images 'for processing' (raw detector data meant for CAD, "
        "with a 'for presentation' twin of the same exposure in most exports): quarantined "
        "unless 'keep'",
    )
    burned_in_annotation: Literal["quarantine", "keep"] = Field(
        "quarantine",
        description="DICOMs flagged Burned In Annotation YES, or not flagged NO on a modality "
        "that routinely burns text in (US, XA, RF, ES, XC, OT, secondary captures), may carry "
        "text in their pixels that header de-identification cannot remove: quarantined unless "
        "'keep' (only for archives already scrubbed of such text)",
    )

    @model_validator(mode="after")
    def _check(self) -> IngestConfig:
        lo, hi = _ordered(self.window_percentiles, "window_percentiles")
        if not (0.0 <= lo < hi <= 100.0):
            raise ValueError("window_percentiles must satisfy 0 <= low < high <= 100")
        return self


class DataConfig(_Section):
    """Where training images come from and how they are augmented."""

    shards: str | None = Field(
        None, min_length=1, description="ingest output folder (its images/ subfolder)"
    )
    crop_size: int = Field(224, ge=16, description="training crop fed to the encoder")
    crop_scale: Range = Field((0.3, 1.0), description="RandomResizedCrop area range")
    crop_ratio: Range = Field((0.75, 4.0 / 3.0), description="RandomResizedCrop aspect range")
    holdout_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="images held out for label-free quality metrics"
    )

    @field_validator("crop_ratio")
    @classmethod
    def _positive_ratio(cls, v: Range) -> Range:
        if min(v) <= 0:
            raise ValueError(f"aspect ratios must be positive, got {tuple(v)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        _ordered(self.crop_scale, "crop_scale")
        _ordered(self.crop_ratio, "crop_ratio")
        if not (0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0):
            raise ValueError("crop_scale must lie in (0, 1]")
        return self


class ModelConfig(_Section):
    """Encoder and predictor architecture."""

    arch: Literal["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge"] = "vit_base"
    patch_size: int = Field(16, ge=2, le=64)
    img_size: int = Field(224, ge=16)
    in_chans: int = Field(1, description="always 1: shards store single-channel radiographs")
    depth: int | None = Field(None, ge=1, description="encoder depth; default from arch")
    pred_width: int = Field(384, ge=16)
    pred_depth: int | None = Field(
        None, ge=1, description="predictor depth; default 6 for tiny/small/base, 12 for large/huge"
    )
    pred_heads: int | None = Field(
        None, ge=1, description="predictor attention heads; default: the encoder's, as in I-JEPA"
    )
    drop_path: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="stochastic depth of the encoder and of the predictor: each one's blocks "
        "are dropped at rates rising linearly to this over its depth (training only)",
    )
    attention: Literal["sdpa", "manual"] = Field(
        "sdpa", description="'manual' is the reference's q@k^T path, for benchmarks only"
    )

    @field_validator("in_chans")
    @classmethod
    def _one_channel(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"must be 1 (shards store single-channel radiographs), got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.pred_width % self.resolved_pred_heads:
            raise ValueError("pred_width must be divisible by pred_heads")
        if self.pred_width % 4:
            # the predictor's 2-D sin-cos position table splits its width in four; found
            # wrong only in every Ray Train worker, each retry failing the same way
            raise ValueError(f"pred_width {self.pred_width} must be a multiple of 4")
        return self

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def embed_dim(self) -> int:
        return MODEL_WIDTHS[self.arch][0]

    @property
    def resolved_depth(self) -> int:
        return self.depth if self.depth is not None else MODEL_WIDTHS[self.arch][1]

    @property
    def num_heads(self) -> int:
        return MODEL_WIDTHS[self.arch][2]

    @property
    def resolved_pred_depth(self) -> int:
        if self.pred_depth is not None:
            return self.pred_depth
        return 12 if self.arch in ("vit_large", "vit_huge") else 6

    @property
    def resolved_pred_heads(self) -> int:
        return self.pred_heads if self.pred_heads is not None else self.num_heads


class MasksConfig(_Section):
    """Multi-block masking (I-JEPA semantics).

    ``masking_ratio`` is the one sweepable knob that maps onto scales: when set, each of the
    ``num_targets`` blocks gets a scale range centred on ``masking_ratio / num_targets`` with
    the method's relative spread (+-1/7), so the default 0.7 with 4 targets gives exactly the
    method's (0.15, 0.2). Leave it unset to give ``target_scale`` directly. Whichever of the two
    a later layer sets (a YAML over the one it extends, ``--set`` over the file, a sweep trial
    over its base) replaces the other; both in one layer is an error.

    ``placement="uniform"`` (the method) draws each block's corner uniformly over the grid
    positions where it fits; ``"clipped"`` draws it past the edges and clips it back, which
    covers border patches about as often as central ones (and makes most blocks touch the
    border).

    Context sets must have one length per batch. The method cuts them to the batch's smallest
    context, so the length changes every step and a compiled GPU step recompiles or falls back
    to dynamic shapes. ``context_length="fixed"`` keeps a length that depends only on this
    section and the grid, ``"per_length"`` one per target-block length: the
    ``context_quantile`` quantile of the context size (estimated once, see
    ``radjepa.masks.fixed_context_lengths``); images whose context is smaller are redrawn,
    exactly as ``min_keep`` does.
    """

    num_targets: int = Field(4, ge=1, le=16)
    target_scale: Range = (0.15, 0.2)
    target_aspect: Range = (0.75, 1.5)
    context_scale: Range = (0.85, 1.0)
    context_aspect: Range = (1.0, 1.0)
    min_keep: int = Field(10, ge=1)
    allow_overlap: bool = False
    masking_ratio: float | None = Field(None, gt=0.0, lt=1.0)
    # "fixed": every batch keeps the same number of context patches (static shapes, so a
    # compiled step never recompiles for it); "per_length": one such number per target-block
    # length (each redraws the same share; one more compiled encoder graph per length);
    # "batch_min": cut to the batch's smallest context.
    context_length: Literal["fixed", "per_length", "batch_min"] = "fixed"
    context_quantile: float = Field(0.05, gt=0.0, lt=0.5)
    # "uniform": corners uniform over [0, grid-size], every row/column reachable (the method
    # without the reference's off-by-one); "clipped": drawn from [-(size-1), grid-1], clipped
    placement: Literal["uniform", "clipped"] = "uniform"

    @model_validator(mode="after")
    def _check(self) -> MasksConfig:
        # masking_ratio derives target_scale; both given together is a contradiction (a later
        # layer's masking_ratio replaces an earlier target_scale: see _layer_masks)
        if self.masking_ratio is not None:
            centre = self.masking_ratio / self.num_targets
            scale = (centre * 6 / 7, centre * 8 / 7)
            if "target_scale" in self.model_fields_set and not all(
                abs(a - b) < 1e-9 for a, b in zip(self.target_scale, scale, strict=True)
            ):
                raise ValueError(
                    f"masking_ratio={self.masking_ratio} and target_scale="
                    f"{tuple(self.target_scale)} are both set; masking_ratio derives the scale "
                    "(set one, or masks.masking_ratio=null to use target_scale)"
                )
            # object.__setattr__ avoids re-entering validation on assignment
            object.__setattr__(self, "target_scale", scale)
        for name in ("target_scale", "context_scale"):
            lo, hi = _ordered(getattr(self, name), name)
            if not (0.0 < lo <= hi <= 1.0):
                raise ValueError(f"{name} must lie in (0, 1], got {(lo, hi)}")
        for name in ("target_aspect", "context_aspect"):
            lo, _ = _ordered(getattr(self, name), name)
            if lo <= 0:
                raise ValueError(f"{name} must be positive")
        return self


class EmaConfig(_Section):
    """Target-encoder momentum, rising linearly from start to end over the whole run."""

    start: float = Field(0.996, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> EmaConfig:
        if self.start > self.end:
            raise ValueError("ema.start must be <= ema.end")
        return self


class OptimConfig(_Section):
    """AdamW with warmup-cosine LR and cosine weight decay, as in the method."""

    lr: float = Field(1e-3, gt=0)
    start_lr: float = Field(2e-4, ge=0)
    final_lr: float = Field(1e-6, ge=0)
    warmup_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="share of total steps spent warming up"
    )
    weight_decay: float = Field(0.04, ge=0)
    final_weight_decay: float = Field(0.4, ge=0)
    betas: Range = (0.9, 0.999)
    grad_clip: float | None = Field(None, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: Range) -> Range:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must lie in [0, 1), got {tuple(v)}")
        return v

    loss: Literal["smooth_l1", "mse"] = "smooth_l1"


class TrainConfig(_Section):
    """The Ray Train job: scale, precision, checkpoints, fault tolerance."""

    run_name: str = Field("radjepa", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    output_dir: str = Field(
        "runs", min_length=1, description="root of run folders (local path or URI)"
    )
    steps: int = Field(1000, ge=1, description="total optimizer steps; schedules span these")
    batch_size: int = Field(64, ge=1, description="per-worker batch size")
    num_workers: int = Field(
        1,
        ge=0,
        description="Ray Train workers (DDP ranks); 0 = from the cluster: one per GPU, or on "
        "CPU one per cpus_per_worker in half the CPUs (the other half feeds Ray Data)",
    )
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: Literal["auto", "true", "false"] = Field(
        "auto", description="'auto' uses GPUs only when the cluster has them"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU")
    _use_gpu = field_validator("use_gpu", mode="before")(_gpu_setting)
    compile: bool = Field(False, description="torch.compile the step (GPU)")
    compile_scope: CompileScope = Field(
        "modules",
        description="what train.compile compiles: 'modules' = the online encoder, target "
        "encoder and predictor whole (fusion across blocks); 'blocks' = each transformer block "
        "in place, one graph shared by all blocks of a module per shape (minutes less to build)",
    )
    seed: int = Field(0, ge=0, le=SEED_MAX)
    log_every: int = Field(
        10,
        ge=1,
        description="steps between metric records (loss, lr, momentum, img_per_s); every "
        "checkpoint step is recorded too, so a checkpoint's report holds its own step's loss",
    )
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    fail_at_step: int | None = Field(
        None, ge=1, description="test switch: rank 0 raises once at this step (off by default)"
    )
    fail_by: Literal["error", "kill"] = Field(
        "error",
        description="test switch: how rank 0 fails at train.fail_at_step: raises (a worker "
        "error) or kills its process (a worker lost: OOM killer, node gone)",
    )
    data_loader_threads: int = Field(
        2,
        ge=0,
        description="batches the training stream prepares ahead of the step, in its background "
        "thread (Ray Data's prefetch_batches; 0: each batch is made when the step asks for it)",
    )
    allow_config_change: bool = Field(
        False,
        description="resume a run although masks/ema/optim/crop settings, train.seed or "
        "train.batch_size differ from its checkpoint (the changed keys are recorded in MLflow)",
    )


class SearchDim(_Section):
    """One dimension of a sweep, addressing a dotted config key."""

    type: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _check(self) -> SearchDim:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"'{self.type}' needs a non-empty 'values' list")
        elif self.low is None or self.high is None or self.low >= self.high:
            raise ValueError(f"'{self.type}' needs low < high")
        elif self.type == "randint" and not (
            float(self.low).is_integer() and float(self.high).is_integer()
        ):
            # int() made low 0.5 a 0: a sweep said "ema.start = -1", a value nobody wrote
            raise ValueError(
                f"'randint' needs whole-number low and high (got {self.low:g}, {self.high:g}); "
                "use 'uniform' for fractions"
            )
        elif self.type == "loguniform" and self.low <= 0:
            # Tune raised this only when the sweep built its space, after the MLflow parent run
            # was made, and the CLI showed its traceback
            raise ValueError(f"'loguniform' needs low > 0 (got {self.low:g}); use 'uniform'")
        return self


class TuneConfig(_Section):
    """A Ray Tune sweep over dotted config keys."""

    name: str = Field("radjepa-sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    search_space: dict[str, SearchDim] = Field(default_factory=dict)
    search_alg: Literal["grid", "random", "optuna"] = "random"
    num_samples: int | None = Field(
        None,
        ge=1,
        description="trials of a random or Optuna search (unset: 4); a grid runs each point once",
    )
    metric: Literal["rankme", "knn_auroc", "probe_auroc"] = "rankme"
    labels_csv: str | None = Field(
        None, min_length=1, description="labels for the supervised metrics"
    )
    label_column: str | None = None
    max_concurrent: int = Field(0, ge=0, description="0: as many as resources allow")
    asha: bool = True
    grace_period: int = Field(1, ge=1, description="ASHA: reports before a trial can be stopped")
    collapse_rankme: float = Field(
        1.5, ge=0, description="a trial whose RankMe falls below this is stopped as collapsed"
    )
    collapse_feature_std: float = Field(
        1e-4,
        ge=0,
        description="... or whose mean per-dimension embedding std falls below this",
    )
    trial_checkpoints: Literal["best", "all"] = Field(
        "best",
        description="after a sweep whose every trial ended without error: 'best' deletes the "
        "other trials' checkpoints, 'all' keeps them",
    )

    @model_validator(mode="after")
    def _space_fits_the_search(self) -> TuneConfig:
        """A grid lists values, so it cannot take a range (Tune drew one random value from it
        for the whole sweep, silently); Optuna cannot take a grid (Tune refused it only once
        the sweep had started, with a traceback)."""
        for key, dim in self.search_space.items():
            if self.search_alg == "grid" and dim.type not in ("choice", "grid"):
                raise ValueError(
                    f"search_space.{key} is '{dim.type}', which search_alg=grid cannot "
                    "enumerate (one random value would be tried): list its values with type "
                    "choice, or use search_alg=random or optuna"
                )
            if self.search_alg == "optuna" and dim.type == "grid":
                raise ValueError(
                    f"search_space.{key} is 'grid', which search_alg=optuna cannot take: "
                    "use type choice, or search_alg=grid or random"
                )
        if self.search_alg == "grid" and self.num_samples not in (None, 1):
            # Tune repeats every grid point num_samples times; the sweep passed 1 and dropped
            # the value in silence. A repeat with the same train.seed trains the same model.
            raise ValueError(
                f"num_samples={self.num_samples} does not apply to search_alg=grid, which runs "
                "each point once: leave num_samples out (or set 1), or add train.seed to the "
                "search_space as a grid to repeat each point with other seeds"
            )
        return self

    def labels_problem(self) -> str | None:
        """Why ``labels_csv`` and ``label_column`` do not fit ``metric``, as a line of a config
        error, or None. A supervised metric without them stopped the sweep only once it had
        read the shards; with RankMe, which is label-free, they were ignored in silence."""
        given = [f"tune.{k}" for k in ("labels_csv", "label_column") if getattr(self, k)]
        if self.metric == "rankme" and given:
            return (
                f"{' and '.join(given)}: used only by tune.metric=knn_auroc or probe_auroc "
                "(which rank trials on the labels), and tune.metric is rankme (label-free): set "
                "tune.metric to one of those, or leave the labels out"
            )
        if self.metric != "rankme" and len(given) < 2:
            missing = " and ".join(
                f"tune.{k}" for k in ("labels_csv", "label_column") if not getattr(self, k)
            )
            return (
                f"tune.metric: {self.metric} needs tune.labels_csv and tune.label_column (the "
                f"labelled images and the label it ranks trials on): set {missing}"
            )
        return None

    @property
    def sample_count(self) -> int:
        """Trials Tune is asked for: ``num_samples``, else 4; 1 for a grid (one per point)."""
        if self.search_alg == "grid":
            return 1
        return self.num_samples or 4


REGISTRY_NAME_MAX = 256  # the width of the name column in MLflow's registry tables


def check_registry_name(name: str) -> str:
    """``name`` if MLflow's registry and our ``models:/`` references can both hold it, else a
    ValueError saying why. Checked when a user's config (with ``tracking.register_model``) or a
    command's option is read: MLflow refuses a bad name only when the version is registered,
    after the training or the probe.

    MLflow's own rules (``mlflow.utils.validation._validate_model_name``): not blank, no '/'
    or ':', and not a name that would resolve to another one as a path ('.', '..' and names
    beginning with '..'). Ours on top: no '@', which splits ``models:/<name>@<alias>``, not
    both kinds of quote, which no registry filter can search, and at most
    ``REGISTRY_NAME_MAX`` characters, what a database-backed registry stores."""
    if not name.strip():
        raise ValueError("a registered model name must not be blank")
    bad = [c for c in ("/", ":", "@") if c in name]
    if bad:
        shown = " or ".join(repr(c) for c in bad)
        raise ValueError(
            f"{name!r}: a registered model name cannot contain {shown} (they split models:/ "
            "references)"
        )
    if name == "." or name.startswith(".."):
        raise ValueError(
            f"{name!r}: MLflow refuses a registered model name that reads as a path ('.', "
            "'..' or one beginning with '..')"
        )
    if "'" in name and '"' in name:
        raise ValueError(f"{name!r}: a registered model name cannot hold both ' and \"")
    if len(name) > REGISTRY_NAME_MAX:
        raise ValueError(
            f"a registered model name holds at most {REGISTRY_NAME_MAX} characters, not {len(name)}"
        )
    return name


class TrackingConfig(_Section):
    """MLflow. ``uri`` None means sqlite in the run folder; MLFLOW_TRACKING_URI overrides."""

    enabled: bool = True
    uri: str | None = Field(None, min_length=1)
    experiment: str = Field("radjepa", min_length=1)
    registered_model: str = Field(
        "radjepa-encoder",
        min_length=1,
        description="registry name; no '/', ':' or '@' (they split models:/ URIs), not '.', "
        "'..' or beginning with '..', not both kinds of quote, at most 256 characters (all but "
        "the first two checked only with register_model)",
    )
    register_model: bool = True

    @field_validator("experiment", "registered_model")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("registered_model")
    @classmethod
    def _registry_name(cls, v: str) -> str:
        # the schema's rule stays the earlier one: a checkpoint's config is validated again
        # when it is loaded, and one saved under a name check_registry_name refuses must load
        # (load_config applies that check to what a user runs)
        if "/" in v or ":" in v:
            raise ValueError(f"{v!r}: a registered model name cannot contain '/' or ':'")
        return v


class ProbeConfig(_Section):
    """Frozen-encoder evaluation."""

    encoder: Literal["target", "context"] = "target"
    split: Literal["kfold", "holdout"] = Field(
        "kfold", description="grouped k-fold by patient, or one patient-level train/test split"
    )
    folds: int = Field(5, ge=2)
    test_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="share of patients held out when split=holdout"
    )
    logreg_c: float = Field(
        0.1, gt=0.0, description="inverse L2 strength of the standardised logistic regression"
    )
    bootstrap: int = Field(1000, ge=0)
    knn_k: int = Field(10, ge=1)
    pixel_baseline_size: int = Field(32, ge=4)
    batch_size: int = Field(32, ge=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    seeds: int = Field(
        1,
        ge=1,
        le=100,
        description="fold seeds probe.seed, probe.seed+1, ...: with more than 1 the linear "
        "probe is repeated with each and the report adds the spread of its point estimates",
    )

    @model_validator(mode="after")
    def _seeds_fit(self) -> ProbeConfig:
        """The last fold seed reaches scikit-learn, which refuses seeds above 2**32 - 1 (after
        the features were extracted, with a traceback)."""
        if self.seed + self.seeds - 1 > SEED_MAX:
            raise ValueError(
                f"probe.seed + probe.seeds - 1 must be at most {SEED_MAX}, got "
                f"{self.seed} + {self.seeds} - 1: lower probe.seed"
            )
        return self


class ServeConfig(_Section):
    """The HTTP API and its Ray Serve deployment."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: str | None = Field(
        None, description="checkpoint folder, or models:/<name>@<alias> in the MLflow registry"
    )
    head: str | None = Field(
        None, description="probe head for /v1/classify: a folder or models:/<name>@<alias>"
    )
    index: str | None = Field(None, description="embeddings Parquet for /v1/similar")
    api_keys_env: str = "RADJEPA_API_KEYS"
    api_keys_file: str | None = None
    insecure_local: bool = Field(False, description="allow running with no API keys (local only)")
    docs_page: bool = Field(
        True,
        description="serve the interactive Swagger UI at /docs, whose scripts a browser loads "
        "from a public CDN on the API's own origin; /openapi.json is served either way",
    )
    max_body_mb: float = Field(64.0, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    num_replicas: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, description="replicas of the API; 'auto' scales between 1 and max_replicas"
    )
    max_replicas: int = Field(
        4, ge=1, description="the autoscaling ceiling under num_replicas=auto (a count ignores it)"
    )
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(
        64,
        ge=-1,
        description="HTTP requests Ray Serve queues per caller (proxy) at the API beyond "
        "max_ongoing_requests before answering 503 at once; the encoder's queue holds this many "
        "requests' images (one call per image) per API replica; -1 = unbounded (requests then "
        "wait into the proxy's timeout)",
    )
    decode_workers: int = Field(
        0,
        ge=0,
        description="threads decoding uploads and searching the index in each API replica, "
        "which reserves one Ray CPU per thread; 0 = one (one per CPU outside Ray Serve)",
    )
    use_gpu: Literal["auto", "true", "false"] = "auto"
    _use_gpu = field_validator("use_gpu", mode="before")(_gpu_setting)


class Config(_Section):
    """Everything a RadJEPA job needs, in one validated object."""

    ingest: IngestConfig = Field(default_factory=IngestConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    masks: MasksConfig = Field(default_factory=MasksConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _cross_check(self) -> Config:
        if self.data.crop_size != self.model.img_size:
            raise ValueError(
                f"data.crop_size ({self.data.crop_size}) must equal model.img_size "
                f"({self.model.img_size}): the encoder is trained on the crops"
            )
        if self.data.crop_size > self.ingest.image_size:
            raise ValueError(
                f"data.crop_size ({self.data.crop_size}) exceeds the stored "
                f"ingest.image_size ({self.ingest.image_size})"
            )
        patches = self.model.grid**2
        if self.masks.min_keep > patches:
            raise ValueError(
                f"masks.min_keep ({self.masks.min_keep}) exceeds the {patches} patches of the "
                f"{self.model.grid}x{self.model.grid} grid (model.img_size / model.patch_size)"
            )
        if self.tune.search_space:
            known = set(flatten(self))
            for key in self.tune.search_space:
                if key not in known or key.startswith("tune."):
                    raise ValueError(
                        f"tune.search_space.{key}: not a config key a trial can set "
                        "(use dotted keys such as masks.masking_ratio or ema.start)"
                    )
        return self

    def with_overrides(self, overrides: Mapping[str, Any] | Iterable[str]) -> Config:
        """A new validated Config with dotted-key overrides applied (dict or ``k=v`` strings)."""
        return apply_overrides(self, overrides)


# ---------------------------------------------------------------------------------------------
# Loading, overriding, dumping


# what a union's branch is called in its error line, and how it is said to the user
_FORMS = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def _union_at(loc: tuple[Any, ...]) -> tuple[int, list[Any]] | None:
    """Where pydantic tagged ``loc`` with a union branch (``serve.num_replicas.int``), and the
    union's members; None when no field on the way is a union of several types."""
    node: Any = Config
    i = 0
    while i < len(loc):
        fields = getattr(node, "model_fields", None)
        if not isinstance(fields, dict) or loc[i] not in fields:
            return None
        ann = fields[loc[i]].annotation
        members = [a for a in get_args(ann) if a is not type(None)]
        if get_origin(ann) in (Union, types.UnionType) and len(members) > 1:
            return (i + 1, members) if i + 1 < len(loc) else None
        if get_origin(ann) is dict:  # dict[str, Section]: the next part is a key
            node, i = get_args(ann)[1], i + 2
        else:
            node, i = ann, i + 1
    return None


def _form(member: Any) -> str:
    """``a whole number >= 1``, ``'auto'``: one allowed form of a union field."""
    if get_origin(member) is Literal:
        return " or ".join(repr(a) for a in get_args(member))
    base, *meta = get_args(member) if get_origin(member) is Annotated else (member,)
    bounds = []
    for m in meta:  # a FieldInfo (Field(ge=1)) holds its bounds in .metadata
        for item in getattr(m, "metadata", None) or [m]:
            bounds += [f"{op} {getattr(item, n)}" for n, op in _BOUNDS if hasattr(item, n)]
    return " ".join([_FORMS.get(base, getattr(base, "__name__", str(base))), *bounds])


def _error_line(e: Any) -> tuple[str, str]:
    """(dotted key, what is wrong) for one pydantic error, in the schema's words."""
    loc = tuple(p for p in e["loc"] if p != "__root__")
    union = _union_at(loc)
    if union is not None:
        # one line per union, naming its forms: pydantic said each branch on its own line,
        # under keys that do not exist ("serve.num_replicas.literal['auto']")
        at, members = union
        forms = " or ".join(_form(m) for m in members)
        return ".".join(map(str, loc[:at])), f"expected {forms}, got {e.get('input')!r}"
    key = ".".join(str(p) for p in loc)
    msg = e["msg"]
    for noise in _PYDANTIC_PREFIXES:
        msg = msg.removeprefix(noise)
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing" and loc and isinstance(loc[-1], int):
        # a range given one value read "masks.target_scale.1: Field required"
        key, msg = key.rsplit(".", 1)[0], "needs two values [low, high]"
    elif e["type"] == "too_long" and (e.get("ctx") or {}).get("field_type") == "Tuple":
        msg = f"needs two values [low, high], got {e['ctx'].get('actual_length')}"
    elif e["type"] == "tuple_type":
        msg = f"needs two values [low, high], got {e.get('input')!r}"
    elif e["type"] == "finite_number":
        msg = f"must be a finite number, got {e.get('input')!r}"
        if len(loc) > 1 and loc[-1] in (0, 1):  # a range's low or high
            key, msg = key.rsplit(".", 1)[0], f"{('low', 'high')[loc[-1]]} {msg}"
    return key, msg


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key, msg = _error_line(e)
        # a check across sections names its keys itself ("data.crop_size (112) must equal ...")
        lines.append(f"{key}: {msg}" if key else msg)
    return "invalid configuration:\n  " + "\n  ".join(dict.fromkeys(lines))


def _validate(data: Mapping[str, Any]) -> Config:
    try:
        return Config.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``a.b=value`` and parse the value as a YAML scalar/list (``0.5``, ``[1,2]``,
    ``null``)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = {}
            node[part] = nxt
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key}")
        node = nxt
    node[parts[-1]] = value


def _text_field(key: str) -> tuple[bool, bool]:
    """(is a text field, also takes null) for a ``section.field`` key."""
    section, _, name = key.partition(".")
    sec = Config.model_fields.get(section)
    sec_type = sec.annotation if sec is not None else None
    if not (isinstance(sec_type, type) and issubclass(sec_type, BaseModel)):
        return False, False
    field = sec_type.model_fields.get(name)
    return (False, False) if field is None else _text_annotation(field.annotation)


def _override_item(item: str) -> tuple[str, Any]:
    """A text field keeps the text as typed (``train.run_name=123`` is the name "123", not a
    number the schema then refuses); every other field gets the YAML-typed value."""
    key, value = parse_override(item)
    text, nullable = _text_field(key)
    if text and not isinstance(value, str) and not (value is None and nullable):
        value = item.split("=", 1)[1].strip()
    return key, value


def apply_overrides(cfg: Config, overrides: Mapping[str, Any] | Iterable[str]) -> Config:
    """Apply dotted-key overrides to ``cfg`` and re-validate the whole tree."""
    items: list[tuple[str, Any]]
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = [_override_item(s) for s in overrides]
    tree = cfg.model_dump(mode="python", exclude_defaults=False)
    if cfg.masks.masking_ratio is not None:
        tree["masks"].pop("target_scale")  # derived, not given
    else:
        tree["masks"].pop("masking_ratio")
    keys = {key for key, _ in items}
    tree = _layer_masks(tree, {"masks": {k[6:]: None for k in keys if k.startswith("masks.")}})
    for key, value in items:
        if key.startswith("tune.search_space."):
            # search-space keys are themselves dotted: tune.search_space.<dotted.key>.<field>,
            # or tune.search_space.<dotted.key> given a whole dimension ({type: choice, ...})
            rest = key[len("tune.search_space.") :]
            dim_key, _, field = rest.rpartition(".")
            if dim_key and field in SearchDim.model_fields and not isinstance(value, Mapping):
                tree["tune"]["search_space"].setdefault(dim_key, {})[field] = value
            else:
                tree["tune"]["search_space"][rest] = value
            continue
        _set_dotted(tree, key, value)
    return _validate(tree)


def _read_text(location: str) -> str | None:
    """A config file's text from a local path or a URI (a sweep on a cluster writes its
    ``best.yaml`` to object storage); None when there is no such file."""
    if "://" not in location and Path(location).is_dir():  # "not found" named a folder there
        raise ConfigError(f"config {location} is a folder: give a YAML file in it")
    try:
        if "://" not in location:  # no pyarrow import for the common case (CLI start-up)
            path = Path(location)
            return path.read_text(encoding="utf-8") if path.is_file() else None
        from radjepa.locations import read_text

        return read_text(location)
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read config {location}: not a UTF-8 text file") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read config {location}: {err}") from None


def _parent_location(location: str, base: str) -> str:
    """Where ``extends: base`` points from the config at ``location``: a URI as given, else
    relative to the config's folder (inside the same bucket or filesystem for a URI config)."""
    if "://" in base:
        return base
    if "://" not in location:
        return str((Path(location).parent / base).resolve())
    parts = urlsplit(location)
    path = posixpath.normpath(posixpath.join(posixpath.dirname(parts.path), base))
    return f"{parts.scheme}://{parts.netloc}{path}" + (f"?{parts.query}" if parts.query else "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping: plain YAML keeps the last one,
    so a pasted-in second ``train:`` section silently replaced the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_document(self, node: yaml.Node) -> Any:
        _keep_text_as_typed(node)
        return super().construct_document(node)


# scalars YAML would read as other than text: in a text field, kept as the characters typed
# (as ``--set`` keeps them); null only where the field takes no null, an optional one's is None
_RETYPED_TAGS = frozenset(
    f"tag:yaml.org,2002:{kind}" for kind in ("int", "float", "timestamp", "bool")
)
_NULL_TAG = "tag:yaml.org,2002:null"


def _keep_text_as_typed(document: yaml.Node) -> None:
    """Have a text field (``section.key``) read its scalar as typed: YAML reads
    ``run_name: 2025_01`` as 202501, ``experiment: 0012`` as the octal 10 and ``1.0e-3`` as
    0.001, and turned back into text those were another name than the one written; it reads
    ``run_name: off`` as false and ``experiment: null`` as None, which a text field refused
    while ``--set`` took the text."""
    if not isinstance(document, yaml.MappingNode):
        return
    for section_node, section in document.value:
        if not isinstance(section, yaml.MappingNode):
            continue
        model = getattr(Config.model_fields.get(section_node.value), "annotation", None)
        fields = getattr(model, "model_fields", {})
        for key_node, value in section.value:
            field = fields.get(key_node.value)
            if field is None or not isinstance(value, yaml.ScalarNode):
                continue
            text, nullable = _text_annotation(field.annotation)
            # a null written out (null, ~) is text as --set takes it; an empty value is no text
            spelled_null = value.tag == _NULL_TAG and value.value != ""
            if text and (value.tag in _RETYPED_TAGS or (spelled_null and not nullable)):
                value.tag = "tag:yaml.org,2002:str"


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping
)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what is wrong and where (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _read_yaml(location: str, seen: tuple[str, ...] = (), named_by: str = "") -> dict[str, Any]:
    """The YAML tree of the config at ``location`` over the ones it extends. ``named_by``
    (`` (named by child.yaml: extends: base.yaml)``) ends the not-found line of an extended
    file: the resolved path alone did not say which config named it, nor how. The line still
    starts "config file not found:", which ``radjepa submit`` lets pass (the file may be on the
    cluster's nodes)."""
    if location in seen:
        raise ConfigError(f"config files extend each other in a loop: {' -> '.join(seen)}")
    text = _read_text(location)
    if text is None:
        raise ConfigError(f"config file not found: {location}{named_by}")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{location}: not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{location}: top level must be a mapping of sections")
    if not data:  # a file truncated or saved blank is easy to miss in a job's log
        log.warning("config file %s is empty: every setting is the default", location)
    base = data.pop("extends", None)
    if base is not None and not isinstance(base, str):
        # a list read "config file not found: .../['a.yaml']"
        raise ConfigError(
            f"{location}: extends takes one config file (a path or URI), got {base!r}"
        )
    if base is not None:
        parent = _read_yaml(
            _parent_location(location, base),
            (*seen, location),
            f" (named by {location}: extends: {base})",
        )
        data = _deep_merge(parent, data)
    return data


def _layer_masks(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """A layer (YAML file over its parent, or overrides over a config) that sets one of the two
    ways of giving the target scale replaces the other one from the layers below."""
    masks = over.get("masks")
    if not isinstance(masks, Mapping) or not isinstance(base.get("masks"), dict):
        return base
    below = dict(base["masks"])
    if "masking_ratio" in masks and "target_scale" not in masks:
        below.pop("target_scale", None)
    if "target_scale" in masks and "masking_ratio" not in masks:
        below.pop("masking_ratio", None)
    return {**base, "masks": below}


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    base = _layer_masks(base, over)
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k != "search_space":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# a password or query credential that `radjepa config show` (any redacted output) replaced by
# its placeholder (radjepa.locations.redact; spelled here so loading a config needs no pyarrow)
_REDACTED_CREDENTIAL = re.compile(
    r"[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:\*\*\*@"
    r"|(?i:[?&][^=&\s]*(?:secret|token|password|passwd|key)[^=&\s]*=)\*\*\*(?=[&\s]|$)"
)


def _refuse_redacted_credentials(cfg: Config) -> None:
    """``radjepa config show`` prints ``user:***@``: its output saved as a config validated and
    then failed to log in with the password ``***``, far from where the credential was lost.
    Checked on what a user loads, not in the schema: a checkpoint keeps its config redacted
    (``radjepa.checkpoint``) and is validated again when it is loaded."""
    keys = [
        key
        for key, value in flatten(cfg).items()
        if isinstance(value, str) and _REDACTED_CREDENTIAL.search(value)
    ]
    if keys:
        raise ConfigError(
            "invalid configuration:\n  "
            + "\n  ".join(
                f"{key}: holds the *** placeholder where a credential goes (this config came "
                "from `radjepa config show`, which hides credentials): put the real credential "
                "back, or leave it out and give it through the environment (MLFLOW_TRACKING_URI, "
                "the storage's own variables)"
                for key in keys
            )
        )


def _refuse_labels_not_fitting_the_metric(cfg: Config) -> None:
    """:meth:`TuneConfig.labels_problem`, for every command's config. Checked on what a user
    loads, not in the schema: a checkpoint's config is validated again when it is loaded, and
    one trained by an earlier version with labels under RankMe (which ignored them) must load."""
    problem = cfg.tune.labels_problem()
    if problem:
        raise ConfigError(f"invalid configuration:\n  {problem}")


def _refuse_unregistrable_name(cfg: Config) -> None:
    """:func:`check_registry_name` for a config that registers its model. Checked on what a
    user loads, not in the schema: a checkpoint saved under a name it refuses (an earlier
    version took '@') must load, and a name never registered is none of the registry's."""
    if not cfg.tracking.register_model:
        return
    try:
        check_registry_name(cfg.tracking.registered_model)
    except ValueError as err:
        raise ConfigError(f"invalid configuration:\n  tracking.registered_model: {err}") from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | Iterable[str] = (),
) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    A YAML file may say ``extends: other.yaml`` (relative to itself) to inherit and refine.
    """
    tree: dict[str, Any] = {} if path is None else _read_yaml(os.fspath(path))
    cfg = _validate(tree)
    items = overrides.items() if isinstance(overrides, Mapping) else list(overrides)
    if items:
        cfg = apply_overrides(cfg, dict(items) if isinstance(overrides, Mapping) else overrides)
    _refuse_redacted_credentials(cfg)
    _refuse_labels_not_fitting_the_metric(cfg)
    _refuse_unregistrable_name(cfg)
    return cfg


def config_to_yaml(cfg: Config) -> str:
    """YAML that ``load_config`` reads back to an equal Config."""
    data = cfg.model_dump(mode="json")
    if cfg.masks.masking_ratio is not None:
        data["masks"].pop("target_scale", None)
    return yaml.safe_dump(data, sort_keys=False)


def flatten(cfg: Config | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted-key view (``{"masks.num_targets": 4, ...}``), e.g. for MLflow params."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg)
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "search_space":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
