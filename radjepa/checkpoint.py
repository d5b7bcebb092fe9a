"""Checkpoints as folders of safetensors + JSON: nothing is ever unpickled on load.

A checkpoint folder holds:

- ``weights.safetensors``: ``encoder.*``, ``target_encoder.*`` and (training checkpoints)
  ``predictor.*`` tensors (the fixed sin-cos position tables are not stored: they are recomputed);
- ``optimizer.safetensors`` + ``optimizer.json`` (training checkpoints only): AdamW state
  tensors as ``state.<param>.<name>``, and the JSON-able rest (scalar state, param groups);
- ``meta.json``: ``format_version``, ``step``, the full ``config`` (JSON), the ``model`` spec,
  the ``value_contract`` the encoder expects, the ``parts`` present, and any ``extra`` keys
  (also copied to the top level, e.g. ``run_name``).

Saving writes a sibling temp folder and renames it into place, so a crash never leaves a
half-written checkpoint under the final name. Loading is strict: a missing or unexpected key is
a :class:`CheckpointError`.

Export for timm: :func:`export_timm` writes ``model.safetensors`` (timm key names, the sin-cos
table stored as the ``pos_embed`` parameter) and ``timm_config.json`` holding the exact call::

    timm.create_model("vit_base_patch16_224", pretrained=True,
        pretrained_cfg_overlay={"file": "<out_dir>/model.safetensors"},
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
        in_chans=1, num_classes=0, class_token=False, global_pool="avg", fc_norm=False,
        qkv_bias=True, pos_embed="learn")

(the numbers are the checkpoint's own; :func:`create_timm_model` runs it). The timm model's
``forward_features(x)`` equals ``VisionEncoder(x)`` and ``forward(x)`` equals ``.embed(x)``, at
the trained image size.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from radjepa.config import Config
from radjepa.locations import redact_strings
from radjepa.models.encoder import VisionEncoder, build_encoder
from radjepa.transforms import MEAN, STD

if TYPE_CHECKING:
    from radjepa.engine import Pretrainer
    from radjepa.jepa import JEPA

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointVersionError",
    "Checkpoint",
    "build_encoder",
    "save",
    "save_checkpoint",
    "load_checkpoint",
    "load_encoder",
    "read_meta",
    "CheckpointUnreadable",
    "check_resumable",
    "is_cut_short",
    "export_timm",
    "create_timm_model",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS, OPTIM, OPTIM_JSON, META = (
    "weights.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "meta.json",
)
PARTS = ("encoder", "target_encoder", "predictor")
_RESERVED = {"format_version", "step", "config", "model", "value_contract", "parts", "extra"}


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, malformed or does not match the model."""


class CheckpointVersionError(CheckpointError):
    """A whole checkpoint that another version of radjepa wrote and this one cannot read (its
    format version, or a config this version's schema refuses). Unlike a damaged checkpoint it
    must not be skipped on resume: an older checkpoint beside it would silently lose its steps.
    """


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read: per-part state dicts, optimizer state, metadata."""

    path: Path
    meta: dict[str, Any]
    config: Config
    weights: dict[str, dict[str, torch.Tensor]]
    optimizer: dict[str, Any] | None

    @property
    def step(self) -> int:
        return int(self.meta["step"])


# ---------------------------------------------------------------------------------------------
# saving


def _model_spec(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    return {
        "arch": m.arch,
        "patch_size": m.patch_size,
        "img_size": m.img_size,
        "in_chans": m.in_chans,
        "embed_dim": m.embed_dim,
        "depth": m.resolved_depth,
        "num_heads": m.num_heads,
        "grid": m.grid,
        "pred_width": m.pred_width,
        "pred_depth": m.resolved_pred_depth,
        "pred_heads": m.resolved_pred_heads,
        "pos_embed": "sincos-2d (fixed, recomputed per grid)",
        "pooling": "mean of final patch tokens",
    }


def _value_contract(cfg: Config) -> dict[str, Any]:
    return {
        "input": f"float32 [B, {cfg.model.in_chans}, {cfg.model.img_size}, {cfg.model.img_size}]",
        "formula": "x = (v / vmax - mean) / std",
        "mean": MEAN,
        "std": STD,
        "vmax": {"uint8": 255, "uint16": 65535},
        "polarity": "MONOCHROME2 (0 = black)",
        "resize": "whole stored image, antialiased bilinear (radjepa.transforms.prepare_images)",
    }


def _flat(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors sharing storage (e.g. one encoder saved as two parts)
    return {
        f"{part}.{k}": v.detach().to("cpu").contiguous().clone()
        for part, sd in parts.items()
        for k, v in sd.items()
    }


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in state["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = v.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    groups = []
    for g in state["param_groups"]:
        gg = {}
        for k, v in g.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            gg[k] = list(v) if isinstance(v, tuple) else v
        groups.append(gg)
    return tensors, {"param_groups": groups, "scalars": scalars}


def _write_folder(path: Path, files: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old: Path | None = None
    try:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                _save_tensors(content, tmp / name)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True))
        if path.exists():  # replace: move the old one aside, swap in, then delete it
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not path.exists():
            # the swap failed half-way (a full disk, a permission): the checkpoint that was
            # there stays under its name, not only under a hidden one nothing reads
            os.replace(old, path)
        raise
    return path


def _save_tensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """``save_file``, whose failed write (a full disk: "I/O error: No space left on device (os
    error 28)") is the OSError it is, naming the file, instead of a SafetensorError without an
    errno: callers tell a full disk (not worth retrying) by it."""
    try:
        save_file(tensors, str(file))
    except SafetensorError as err:
        found = re.search(r"\(os error (\d+)\)", str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(file)) from err


def _meta(cfg: Config, step: int, parts: list[str], extra: dict | None, has_opt: bool) -> dict:
    extra = dict(extra or {})
    meta: dict[str, Any] = {k: v for k, v in extra.items() if k not in _RESERVED}
    meta.update(
        format_version=FORMAT_VERSION,
        step=int(step),
        # the registered model carries this file: no credentials from URIs in the config (the
        # weights' fingerprint covers it, so it is written redacted once, not redacted on upload)
        config=redact_strings(cfg.model_dump(mode="json")),
        model=_model_spec(cfg),
        value_contract=_value_contract(cfg),
        parts=parts,
        has_optimizer=has_opt,
        extra=extra,
    )
    return meta


def save_checkpoint(
    path: str | os.PathLike[str],
    source: Pretrainer | JEPA,
    *,
    cfg: Config | None = None,
    step: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a training checkpoint folder from a :class:`Pretrainer` (all state) or a
    :class:`JEPA` (weights only; then ``cfg`` is required). Returns the folder."""
    from radjepa.engine import Pretrainer

    files: dict[str, Any] = {}
    if isinstance(source, Pretrainer):
        state = source.state_dict()
        cfg = source.cfg if cfg is None else cfg
        step = source.step if step is None else step
        parts = {p: state[p] for p in PARTS}
        tensors, rest = _split_optimizer(state["optimizer"])
        rest["mask_sampler"] = state["mask_sampler"]
        files[OPTIM], files[OPTIM_JSON] = tensors, rest
    else:
        if cfg is None:
            raise ValueError("save_checkpoint(JEPA) needs cfg=")
        parts = {p: getattr(source, p).state_dict() for p in PARTS}
    files[WEIGHTS] = _flat(parts)
    files[META] = _meta(cfg, step or 0, list(parts), extra, OPTIM in files)
    return _write_folder(Path(path), files)


def save(
    path: str | os.PathLike[str],
    encoder: VisionEncoder,
    cfg: Config,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """An encoder-only checkpoint (the encoder stands for both context and target)."""
    sd = encoder.state_dict()
    files = {
        WEIGHTS: _flat({"encoder": sd, "target_encoder": sd}),
        META: _meta(cfg, step, ["encoder", "target_encoder"], extra, False),
    }
    return _write_folder(Path(path), files)


# ---------------------------------------------------------------------------------------------
# loading


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of a checkpoint folder, checked for a supported format version."""
    p = Path(path)
    meta_path = p / META
    if not meta_path.is_file():
        raise CheckpointError(f"{p} is not a checkpoint folder (no {META})")
    try:
        text = meta_path.read_text()
    except (OSError, ValueError) as err:  # unreadable, not UTF-8
        raise CheckpointError(f"{meta_path}: unreadable: {err}") from None
    return _checked_meta(text, p)


def _checked_meta(text: str, where: object) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise CheckpointError(f"{where}/{META}: not valid JSON: {err}") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version != FORMAT_VERSION:
        newer = "a newer" if version > FORMAT_VERSION else "an older"
        raise CheckpointVersionError(
            f"{where}: checkpoint format_version {version} was written by {newer} version of "
            f"radjepa; this version reads format_version {FORMAT_VERSION}"
        )
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where}/{META}: no valid format_version ({version!r})")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{where}/{META}: no config or step in the checkpoint metadata")
    return meta


def check_resumable(location: str | os.PathLike[str]) -> tuple[int, Config]:
    """Step and config of the training checkpoint at ``location`` (a folder or any pyarrow
    URI), once every file a resume reads is found whole. Raises :class:`CheckpointError` for a
    checkpoint proven damaged (a file missing, cut short, not parsing) and
    :class:`CheckpointUnreadable` when the storage failed a read.

    Reads kilobytes, not the weights: the metadata and optimizer JSON must parse, and each
    safetensors file must be exactly as long as its own header says. That is what a full disk
    or an upload cut short breaks; safetensors keeps no checksum of the tensor bytes, so loading
    them all (gigabytes, downloaded from object storage, on every start) would catch nothing more.
    """
    from radjepa.locations import filesystem

    where = str(location)
    try:
        fs, root = filesystem(location)
        with fs.open_input_stream(f"{root}/{META}") as f:
            meta = _checked_meta(f.read().decode("utf-8"), where)
        for name in (WEIGHTS, OPTIM):
            _check_whole(fs, f"{root}/{name}", f"{where}/{name}")
        with fs.open_input_stream(f"{root}/{OPTIM_JSON}") as f:
            if not isinstance(json.loads(f.read().decode("utf-8")).get("param_groups"), list):
                raise CheckpointError(f"{where}/{OPTIM_JSON}: no optimizer param groups")
    except CheckpointError:
        raise
    except FileNotFoundError as err:
        raise CheckpointError(f"{where}: a file is missing: {err}") from None
    except OSError as err:  # the storage's answer, not the checkpoint's: see CheckpointUnreadable
        raise CheckpointUnreadable(f"cannot read checkpoint {where}: {err}") from None
    except (ValueError, AttributeError) as err:
        raise CheckpointError(f"{where}: a damaged file: {err}") from None
    return meta["step"], _saved_config(Path(root), meta)


class CheckpointUnreadable(OSError):
    """The storage holding a checkpoint failed a read (a network error, an object store's
    throttling, a permission): nothing is known of the checkpoint itself. Taken for damage, it
    made a resume skip a good newest checkpoint, redo its steps, and delete it later as a
    stray folder."""


def is_cut_short(location: str | os.PathLike[str]) -> bool:
    """Whether the training checkpoint folder at ``location`` (a folder or any pyarrow URI) is
    provably incomplete: one of its four files is missing, a JSON file does not parse, or a
    safetensors file is not as long as its own header says. That is what a crash or a full disk
    leaves mid-copy (Ray copies into the final folder name; object storage shows the files
    written so far). False when every file is whole, whatever its content (a checkpoint of
    another radjepa version is whole). An unreadable storage raises OSError instead of
    answering, so that a network error never makes a good checkpoint look incomplete.
    """
    import pyarrow.fs as pafs

    from radjepa.locations import filesystem

    fs, root = filesystem(location)
    names = (META, OPTIM_JSON, WEIGHTS, OPTIM)
    infos = fs.get_file_info([f"{root}/{name}" for name in names])
    if any(info.type != pafs.FileType.File for info in infos):
        return True
    for name in (META, OPTIM_JSON):
        with fs.open_input_stream(f"{root}/{name}") as f:
            text = f.read()
        try:
            json.loads(text.decode("utf-8"))
        except ValueError:  # cut short mid-file (or not UTF-8): never a whole JSON document
            return True
    for name in (WEIGHTS, OPTIM):
        try:
            _check_whole(fs, f"{root}/{name}", f"{location}/{name}")
        except CheckpointError:
            return True
    return False


_MAX_HEADER = 100 << 20  # safetensors' own bound on a header


def _check_whole(fs: Any, path: str, where: str) -> None:
    size = fs.get_file_info(path).size
    if size is None:
        raise CheckpointError(f"{where}: missing")
    with fs.open_input_file(path) as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 <= n <= min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{where}: damaged or cut short ({size} bytes, no valid header)")
        try:
            header = json.loads(f.read(n))
            end = max(
                (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise CheckpointError(f"{where}: damaged header") from None
    if 8 + n + end != size:
        raise CheckpointError(
            f"{where}: {size} bytes but its header describes {8 + n + end}: cut short or damaged"
        )


def _load_tensors(file: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A truncated or damaged file (a disk that filled up, a copy cut short) is a checkpoint
    problem the caller can act on (resume picks an older checkpoint), not a library crash."""
    try:
        return load_file(str(file), device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: damaged or unreadable: {err}") from None


def _read_weights(p: Path, map_location: str | torch.device) -> dict[str, dict[str, torch.Tensor]]:
    if not (p / WEIGHTS).is_file():
        raise CheckpointError(f"{p}: missing {WEIGHTS}")
    flat = _load_tensors(p / WEIGHTS, map_location)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        part, _, name = key.partition(".")
        if part not in PARTS or not name:
            raise CheckpointError(f"{p}/{WEIGHTS}: unexpected tensor {key!r}")
        parts.setdefault(part, {})[name] = v
    return parts


def _read_optimizer(p: Path) -> dict[str, Any] | None:
    if not (p / OPTIM).is_file():
        return None
    if not (p / OPTIM_JSON).is_file():
        raise CheckpointError(f"{p}: {OPTIM} without {OPTIM_JSON}")
    tensors = _load_tensors(p / OPTIM)
    try:
        rest = json.loads((p / OPTIM_JSON).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{p}/{OPTIM_JSON}: not valid JSON: {err}") from None
    try:
        state: dict[int, dict[str, Any]] = {}
        for key, v in tensors.items():
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
        for pid, sc in rest.get("scalars", {}).items():
            state.setdefault(int(pid), {}).update(sc)
        groups = []
        for g in rest["param_groups"]:
            g = dict(g)
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
            groups.append(g)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{p}: malformed optimizer state: {err!r}") from None
    return {
        "state": state,
        "param_groups": groups,
        "mask_sampler": rest.get("mask_sampler"),
    }


def _load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{what} does not match the model: {err}") from None


def saved_config(path: str | os.PathLike[str]) -> Config:
    """The config the checkpoint folder ``path`` was trained with (:func:`_saved_config`),
    without loading its weights."""
    return _saved_config(Path(path), read_meta(path))


def _saved_config(p: Path, meta: dict[str, Any]) -> Config:
    """The config a checkpoint was trained with. Training and serving are upgraded apart, so a
    key this version does not know is dropped with a warning, unless it is in ``model`` (an
    unknown architecture switch would build a different network than the weights expect).

    Architecture values left to a default are pinned from the resolved ``model`` record: a
    later version may change a default (the predictor's heads did) and would otherwise build
    the same weights into a network that computes something else, with no error.
    """
    cfg = _validated_config(p, _with_earlier_defaults(meta["config"]))
    spec = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    saved = spec.get("pred_heads")
    if cfg.model.pred_heads is None and saved and saved != cfg.model.resolved_pred_heads:
        cfg = cfg.with_overrides({"model.pred_heads": int(saved)})
    return cfg


# Defaults a later version changed, with the value every checkpoint written before carries by
# leaving the key out: its run trained with that one, and its resume compares settings
# (radjepa.resume) as it trained them, so a switch needs train.allow_config_change.
_EARLIER_DEFAULTS = {("masks", "placement"): "clipped"}


def _with_earlier_defaults(data: Any) -> Any:
    if not isinstance(data, dict):
        return data  # left to validation to refuse
    data = json.loads(json.dumps(data))
    for (section, key), value in _EARLIER_DEFAULTS.items():
        if isinstance(data.get(section), dict) and key not in data[section]:
            data[section][key] = value
    return data


def _validated_config(p: Path, data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        problems = err.errors()
        unknown = [e["loc"] for e in problems if e["type"] == "extra_forbidden"]
        if len(unknown) != len(problems) or any(loc[0] == "model" for loc in unknown):
            raise CheckpointVersionError(
                f"{p}: its config does not fit this version of radjepa: {err}"
            ) from None
    cleaned = json.loads(json.dumps(data))
    for loc in unknown:
        node = cleaned
        for key in loc[:-1]:
            node = node[key]
        node.pop(loc[-1], None)
    log.warning(
        "%s: ignoring config keys from a newer radjepa: %s",
        p,
        ", ".join(".".join(map(str, loc)) for loc in unknown),
    )
    return Config.model_validate(cleaned)


def load_checkpoint(
    path: str | os.PathLike[str],
    into: Pretrainer | JEPA | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Read a checkpoint folder; with ``into`` restore it (strictly) into a Pretrainer (weights,
    optimizer, step; the betas and the mask seed stay the trainer's config's) or a JEPA
    (weights)."""
    from radjepa.engine import Pretrainer

    p = Path(path)
    meta = read_meta(p)
    cfg = _saved_config(p, meta)
    weights = _read_weights(p, map_location)
    missing = [part for part in meta.get("parts", []) if part not in weights]
    if missing:
        raise CheckpointError(f"{p}: weights for {missing} are missing")
    opt = _read_optimizer(p)
    ckpt = Checkpoint(path=p, meta=meta, config=cfg, weights=weights, optimizer=opt)
    if into is None:
        return ckpt
    model = into.model if isinstance(into, Pretrainer) else into
    if isinstance(into, Pretrainer):
        # attention is a kernel choice and drop_path a regulariser: neither is in the weights
        # (a drop_path change is a training setting, guarded by radjepa.resume)
        theirs = cfg.model.model_dump(exclude={"attention", "drop_path"})
        ours = into.cfg.model.model_dump(exclude={"attention", "drop_path"})
        if theirs != ours:
            raise CheckpointError(
                f"{p}: checkpoint model {theirs} differs from the trainer's {ours}"
            )
    for part in PARTS:
        if part not in weights:
            raise CheckpointError(f"{p}: no {part} weights (an encoder-only checkpoint?)")
        _load_strict(getattr(model, part), weights[part], f"{p}: {part}")
    if isinstance(into, Pretrainer):
        if opt is None:
            raise CheckpointError(f"{p}: no optimizer state, cannot resume training from it")
        # the saved param groups also carry the kernel choice of the device that wrote them,
        # and torch places each parameter's step count by it when loading: given before the
        # load, the trainer's own choice (a CPU or reference-mode checkpoint resumed on a GPU
        # keeps its fused AdamW, with the step counts on the GPU where that kernel needs them)
        try:
            groups = [
                {**saved, **{k: ours[k] for k in _KERNEL_CHOICES if k in ours}}
                for saved, ours in zip(
                    opt["param_groups"], into.optimizer.param_groups, strict=True
                )
            ]
            into.optimizer.load_state_dict({"state": opt["state"], "param_groups": groups})
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{p}: optimizer state does not match: {err}") from None
        # the saved param groups carry the betas the checkpoint was trained with; a resume the
        # user allowed to change optim.* must train with the new ones (lr and weight decay are
        # set from the schedule at every step anyway)
        for group in into.optimizer.param_groups:
            group["betas"] = tuple(into.cfg.optim.betas)
        into.step = ckpt.step
        # the masks are drawn from the trainer's train.seed, as its crops and data order are:
        # a resume allowed to change the seed draws all three anew, not two of them (the seed
        # saved beside the optimizer state only says what the checkpoint was trained with)
        into.sampler.seed = into.cfg.train.seed
    return ckpt


# how the optimizer computes its update, chosen by the trainer for its device, not saved state
_KERNEL_CHOICES = ("fused", "foreach", "capturable")


def load_encoder(
    path: str | os.PathLike[str],
    which: Literal["target", "context"] = "target",
    map_location: str | torch.device = "cpu",
) -> tuple[VisionEncoder, Config]:
    """The target (default: what the method evaluates) or context encoder, in eval mode."""
    if which not in ("target", "context"):
        raise ValueError(f"which must be 'target' or 'context', got {which!r}")
    p = Path(path)
    meta = read_meta(p)
    cfg = _saved_config(p, meta)
    part = "target_encoder" if which == "target" else "encoder"
    weights = _read_weights(p, map_location)
    if part not in weights:
        raise CheckpointError(f"{p}: no {part} weights")
    encoder = build_encoder(cfg.model)
    _load_strict(encoder, weights[part], f"{p}: {part}")
    return encoder.to(map_location).eval(), cfg


# ---------------------------------------------------------------------------------------------
# timm export


def _timm_call(cfg: Config) -> tuple[str, dict[str, Any]]:
    m = cfg.model
    # any registered ViT name works (the kwargs define the shape), but it must exist for every
    # patch size: timm registers vit_base_patch16_224, not vit_base_patch14_224
    name = "vit_base_patch16_224"
    kwargs = {
        "img_size": m.img_size,
        "patch_size": m.patch_size,
        "embed_dim": m.embed_dim,
        "depth": m.resolved_depth,
        "num_heads": m.num_heads,
        "mlp_ratio": 4.0,
        "in_chans": m.in_chans,
        "num_classes": 0,
        "class_token": False,
        "global_pool": "avg",
        "fc_norm": False,
        "qkv_bias": True,
        "pos_embed": "learn",
    }
    return name, kwargs


def export_timm(
    path_ckpt: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    which: Literal["target", "context"] = "target",
) -> Path:
    """Write ``model.safetensors`` + ``timm_config.json`` that ``timm.create_model`` loads
    (the exact call is in the JSON's ``call`` and in this module's docstring)."""
    encoder, cfg = load_encoder(path_ckpt, which=which)
    sd = {k: v.contiguous().clone() for k, v in encoder.state_dict().items()}
    sd["pos_embed"] = encoder.pos_embed.detach().clone()  # [1, N, D], as timm's parameter
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"))
    name, kwargs = _timm_call(cfg)
    weights = str((out / "model.safetensors").resolve())
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    call = (
        f"timm.create_model({name!r}, pretrained=True, "
        f"pretrained_cfg_overlay={{'file': {weights!r}}}, {args})"
    )
    info = {
        "model_name": name,
        "kwargs": kwargs,
        "weights": "model.safetensors",
        "call": call,
        "source_checkpoint": str(Path(path_ckpt).resolve()),
        "encoder": which,
        "value_contract": _value_contract(cfg),
        "outputs": "forward_features: [B, N, D] patch tokens; forward: [B, D] mean-pooled",
    }
    (out / "timm_config.json").write_text(json.dumps(info, indent=2))
    log.info("exported %s encoder of %s to %s", which, path_ckpt, out)
    return out


def create_timm_model(export_dir: str | os.PathLike[str]) -> torch.nn.Module:
    """Build the exported encoder with ``timm.create_model`` exactly as documented."""
    import timm

    d = Path(export_dir)
    info = json.loads((d / "timm_config.json").read_text())
    return timm.create_model(
        info["model_name"],
        pretrained=True,
        pretrained_cfg_overlay={"file": str((d / info["weights"]).resolve())},
        **info["kwargs"],
    ).eval()
