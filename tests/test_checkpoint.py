"""Checkpoint folders: bit-exact round trip, exact resume, strictness, no pickle, timm export."""

from __future__ import annotations

import json
import pickle

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from radjepa.checkpoint import (
    CheckpointError,
    create_timm_model,
    export_timm,
    load_checkpoint,
    load_encoder,
    read_meta,
    save,
    save_checkpoint,
)
from radjepa.config import load_config
from radjepa.engine import Pretrainer
from radjepa.models import build_encoder

TINY = "configs/tiny_cpu.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(i: int) -> torch.Tensor:
    return torch.randn(4, 1, 96, 96, generator=torch.Generator().manual_seed(100 + i))


@pytest.fixture
def trained(tmp_path):
    p = Pretrainer(load_config(TINY), "cpu")
    for i in range(2):
        p.train_step(_batch(i))
    path = save_checkpoint(tmp_path / "ckpt", p, extra={"run_name": "unit"})
    return p, path


def _assert_same_state(a: dict, b: dict) -> None:
    for part in ("encoder", "target_encoder", "predictor"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for pid in oa["state"]:
        for name, v in oa["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][pid][name]))
    assert a["step"] == b["step"] and a["mask_sampler"] == b["mask_sampler"]


def test_folder_layout_and_meta(trained):
    _, path = trained
    names = sorted(p.name for p in path.iterdir())
    assert names == ["meta.json", "optimizer.json", "optimizer.safetensors", "weights.safetensors"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left
    meta = read_meta(path)
    assert meta["step"] == 2 and meta["run_name"] == "unit" and meta["format_version"] == 1
    assert meta["model"]["embed_dim"] == 192 and meta["value_contract"]["std"] == 0.25
    assert load_config(TINY).model_dump(mode="json") == meta["config"]


def test_round_trip_is_bit_exact_and_never_unpickles(trained, monkeypatch):
    p, path = trained

    def refuse(*a, **k):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    q = Pretrainer(load_config(TINY), "cpu")
    load_checkpoint(path, q)
    _assert_same_state(p.state_dict(), q.state_dict())


def test_resumed_run_continues_exactly(trained):
    p, path = trained
    q = Pretrainer(load_config(TINY), "cpu")
    with torch.no_grad():  # other weights than the checkpoint's: all of them are restored
        for param in q.model.parameters():
            param.add_(torch.randn_like(param))
    load_checkpoint(path, q)
    for i in (2, 3):
        lp, lq = p.train_step(_batch(i)), q.train_step(_batch(i))
        assert torch.equal(lp["loss"], lq["loss"])
    _assert_same_state(p.state_dict(), q.state_dict())


def test_a_trainer_with_another_seed_draws_its_masks_from_its_own(trained):
    """A resume allowed to change train.seed starts new crops and a new data order from it:
    its masks kept the checkpoint's seed, so one run mixed two seeds."""
    p, path = trained
    q = Pretrainer(load_config(TINY, ["train.seed=123"]), "cpu")
    load_checkpoint(path, q)
    assert q.step == p.step and p.sampler.seed != 123
    assert q.sampler.seed == 123
    theirs, ours = p.sampler.sample(4, q.step), q.sampler.sample(4, q.step)
    assert not torch.equal(theirs.context, ours.context)


def test_saving_again_replaces_atomically(trained):
    p, path = trained
    p.train_step(_batch(5))
    save_checkpoint(path, p)
    assert read_meta(path)["step"] == 3
    assert [x.name for x in path.parent.iterdir()] == ["ckpt"]


def test_a_replacement_that_fails_half_way_keeps_the_old_checkpoint_under_its_name(
    trained, monkeypatch
):
    """The old folder was moved aside before the new one was moved in: a failure between
    the two left no checkpoint under the name, only a hidden ``.ckpt.old-*`` nothing reads."""
    import os

    import radjepa.checkpoint as checkpoint

    p, path = trained
    p.train_step(_batch(5))
    real = os.replace

    def fails_to_swap_in(src, dst):
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", fails_to_swap_in)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, p)
    assert read_meta(path)["step"] == 2
    assert [x.name for x in path.parent.iterdir()] == ["ckpt"]


def test_strict_loading_errors(trained, tmp_path):
    _, path = trained
    weights = load_file(str(path / "weights.safetensors"))
    weights.pop("encoder.norm.weight")
    save_file(weights, str(path / "weights.safetensors"))
    with pytest.raises(CheckpointError, match="encoder"):
        load_checkpoint(path, Pretrainer(load_config(TINY), "cpu"))
    with pytest.raises(CheckpointError, match="encoder"):
        load_encoder(path, which="context")
    other = Pretrainer(load_config(TINY, ["model.depth=2"]), "cpu")
    with pytest.raises(CheckpointError, match="differs"):
        load_checkpoint(path, other)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_meta(tmp_path / "nothing")
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version"):
        read_meta(path)


def test_load_encoder_target_and_context(trained):
    p, path = trained
    target, cfg = load_encoder(path)
    context, _ = load_encoder(path, which="context")
    assert cfg.model == p.cfg.model and not target.training
    x = _batch(9)
    with torch.no_grad():
        assert torch.equal(target(x), p.model.target_encoder(x))
        assert torch.equal(context(x), p.model.encoder(x))
        assert not torch.equal(target(x), context(x))


def test_a_checkpoint_from_before_a_default_changed_keeps_what_it_trained_with(trained):
    # masks.placement came with a new default ("uniform"); a checkpoint written before has no
    # such key and trained with the clipped starts: read as the new default, its resume would
    # have switched the masks mid-run without a word
    from radjepa.resume import ResumeError, check_resume_config

    p, path = trained
    meta = json.loads((path / "meta.json").read_text())
    assert meta["config"]["masks"]["placement"] == "uniform"  # written by this version
    del meta["config"]["masks"]["placement"]
    (path / "meta.json").write_text(json.dumps(meta))
    saved = load_checkpoint(path).config
    assert saved.masks.placement == "clipped"
    with pytest.raises(ResumeError, match="masks.placement"):
        check_resume_config(saved, p.cfg, 2)
    resumed = Pretrainer(load_config(TINY, ["masks.placement=clipped"]), "cpu")
    load_checkpoint(path, resumed)  # with the settings it trained with, it resumes as before
    assert check_resume_config(saved, resumed.cfg, 2) == {}


def test_config_keys_from_a_newer_version(trained, caplog):
    # training and serving are upgraded apart: an unknown training knob is dropped with a
    # warning, an unknown architecture switch is refused
    p, path = trained
    meta = json.loads((path / "meta.json").read_text())
    meta["config"]["train"]["new_knob"] = 3
    meta["config"]["newsection"] = {"x": 1}
    (path / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        target, cfg = load_encoder(path)
    assert cfg.model == p.cfg.model
    assert "train.new_knob" in caplog.text and "newsection" in caplog.text
    meta["config"]["model"]["qk_norm"] = True
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit this version"):
        load_encoder(path)


def test_a_default_changed_since_saving_does_not_change_the_network(trained):
    # a checkpoint that left pred_heads to its default (then pred_width // 64) records the
    # resolved count; loading pins it instead of resolving today's default (encoder heads)
    p, path = trained
    meta = json.loads((path / "meta.json").read_text())
    assert meta["model"]["pred_heads"] == 2  # tiny_cpu.yaml sets 2; the default would be 3
    meta["config"]["model"]["pred_heads"] = None
    (path / "meta.json").write_text(json.dumps(meta))
    ckpt = load_checkpoint(path)
    assert ckpt.config.model.pred_heads == 2
    fresh = Pretrainer(ckpt.config, "cpu")
    load_checkpoint(path, fresh)  # strict: same network as saved
    assert fresh.model.predictor.blocks[0].attn.num_heads == 2


def test_encoder_only_checkpoint(tmp_path):
    cfg = load_config(TINY)
    enc = build_encoder(cfg)
    path = save(tmp_path / "enc", enc, cfg, step=7)
    loaded, _ = load_encoder(path)
    x = _batch(0)
    with torch.no_grad():
        assert torch.equal(loaded(x), enc.eval()(x))
    assert read_meta(path)["step"] == 7
    with pytest.raises(CheckpointError, match="predictor"):
        load_checkpoint(path, Pretrainer(cfg, "cpu"))


def test_exported_encoder_loads_in_timm_with_identical_outputs(trained, tmp_path):
    _, path = trained
    out = export_timm(path, tmp_path / "timm")
    info = json.loads((out / "timm_config.json").read_text())
    encoder, _ = load_encoder(path)
    x = _batch(11)
    # the documented call string itself, evaluated
    model = eval(info["call"], {"timm": timm}).eval()  # noqa: S307 - our own generated call
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), encoder(x))
        assert torch.equal(model(x), encoder.embed(x))
        assert torch.equal(create_timm_model(out)(x), encoder.embed(x))


@pytest.mark.parametrize("patch", [14, 16])
def test_export_works_for_every_patch_size(tmp_path, patch):
    # RadJEPA's own shape is ViT-B/14: timm has no "vit_base_patch14_224" to name
    sets = [f"model.patch_size={patch}", "model.img_size=112", "data.crop_size=112"]
    cfg = load_config(TINY, sets)
    enc = build_encoder(cfg)
    out = export_timm(save(tmp_path / "enc", enc, cfg, step=1), tmp_path / "timm")
    x = torch.randn(2, 1, 112, 112)
    with torch.no_grad():
        assert torch.equal(create_timm_model(out)(x), enc.eval().embed(x))


@pytest.mark.parametrize("name", ["weights.safetensors", "optimizer.safetensors"])
def test_a_file_cut_short_is_a_checkpoint_error(trained, name):
    # a full disk or an interrupted copy: resume must be able to tell it from a bug
    _, path = trained
    with open(path / name, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match=f"{name}: damaged or unreadable"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path, Pretrainer(load_config(TINY), "cpu"))


def test_unreadable_meta_is_a_checkpoint_error(trained):
    _, path = trained
    (path / "meta.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="meta.json"):
        read_meta(path)
    (path / "meta.json").write_text('{"format_version": 1}')
    with pytest.raises(CheckpointError, match="no config or step"):
        load_checkpoint(path)


def test_resume_trains_with_the_configs_betas_not_the_checkpoints(trained):
    # optimizer.load_state_dict restores the saved param groups; a resume that was allowed to
    # change optim.betas must still use the new ones
    _, path = trained
    q = Pretrainer(load_config(TINY, ["optim.betas=[0.8, 0.95]"]), "cpu")
    load_checkpoint(path, q)
    assert [g["betas"] for g in q.optimizer.param_groups] == [(0.8, 0.95)] * 2
    assert q.step == 2


def test_resume_keeps_the_optimizer_kernels_its_device_chose(trained):
    # the saved param groups carry fused/foreach of the writer: a checkpoint from a CPU run
    # (fused None) or a reference-mode run (foreach False) made a GPU resume lose fused AdamW
    _, path = trained
    q = Pretrainer(load_config(TINY), "cpu")
    for group in q.optimizer.param_groups:  # what a CUDA trainer builds (optim.build_optimizer)
        group.update(fused=True, foreach=None, capturable=False)
    # torch places each step count by the flags of the groups it loads (on the parameter's
    # device for fused): set after the load, they left the counts on the CPU, and the fused
    # kernel refuses a CPU step count beside CUDA parameters
    loaded: list[list] = []
    q.optimizer.register_load_state_dict_pre_hook(
        lambda _, sd: loaded.append([g["fused"] for g in sd["param_groups"]])
    )
    load_checkpoint(path, q)
    assert loaded == [[True, True]]
    assert [g["fused"] for g in q.optimizer.param_groups] == [True, True]
    assert [g["foreach"] for g in q.optimizer.param_groups] == [None, None]
    slow = Pretrainer(load_config(TINY), "cpu", reference_mode=True)
    load_checkpoint(path, slow)  # the reference mode keeps torch's own choice, as it measures
    assert [(g["fused"], g["foreach"]) for g in slow.optimizer.param_groups] == [(None, None)] * 2


def test_a_full_disk_while_saving_is_an_oserror_naming_the_file(small_disk):
    # safetensors said a full disk as a SafetensorError ("I/O error: No space left on device
    # (os error 28)") without an errno: the job could not tell it from a bug, and retried it
    import errno

    p = Pretrainer(load_config(TINY), "cpu")
    with pytest.raises(OSError) as err:
        save_checkpoint(small_disk / "ckpt", p)
    assert err.value.errno == errno.ENOSPC
    assert err.value.filename.startswith(str(small_disk))
    assert err.value.filename.endswith(".safetensors")
    assert list(small_disk.iterdir()) == []  # nothing half-written left behind
