"""The config schema is the contract between CLI, jobs, sweeps and serving."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from radjepa.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_to_yaml,
    flatten,
    load_config,
    parse_override,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_mirror_the_method():
    cfg = load_config()
    assert cfg.masks.num_targets == 4
    assert cfg.masks.target_scale == (0.15, 0.2)
    assert cfg.masks.target_aspect == (0.75, 1.5)
    assert cfg.masks.context_scale == (0.85, 1.0)
    assert cfg.masks.placement == "uniform"  # block corners uniform over the grid
    assert load_config(None, ["masks.placement=clipped"]).masks.placement == "clipped"
    assert cfg.ema.start == 0.996 and cfg.ema.end == 1.0
    assert cfg.model.pred_width == 384 and cfg.model.resolved_pred_depth == 6
    assert cfg.optim.weight_decay == 0.04 and cfg.optim.final_weight_decay == 0.4
    assert cfg.data.crop_scale == (0.3, 1.0)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config)


def test_shipped_base_configs_match_the_published_shapes():
    b14 = load_config(CONFIGS / "vit_base_p14.yaml")
    assert (b14.model.arch, b14.model.patch_size, b14.model.img_size) == ("vit_base", 14, 224)
    assert b14.model.grid == 16  # 256 patch tokens, as RadJEPA
    b16 = load_config(CONFIGS / "vit_base_p16.yaml")
    assert b16.model.grid == 14
    huge = load_config(CONFIGS / "vit_huge_p14.yaml")
    assert huge.model.resolved_pred_depth == 12
    # the predictor depth follows the arch unless pinned: a larger encoder gets the deeper one
    large = load_config(CONFIGS / "vit_base_p16.yaml", ["model.arch=vit_large"])
    assert large.model.resolved_pred_depth == 12


def test_overrides_apply_with_yaml_typed_values():
    cfg = load_config(
        CONFIGS / "tiny_cpu.yaml",
        [
            "masks.num_targets=3",
            "ema.start=0.99",
            "masks.target_scale=[0.1, 0.12]",
            "train.fail_at_step=null",
            "tracking.enabled=false",
        ],
    )
    assert cfg.masks.num_targets == 3
    assert cfg.ema.start == 0.99
    assert cfg.masks.target_scale == (0.1, 0.12)
    assert cfg.tracking.enabled is False


def test_dict_overrides_match_string_overrides():
    base = load_config(CONFIGS / "tiny_cpu.yaml")
    a = apply_overrides(base, {"masks.num_targets": 2, "optim.lr": 0.01})
    b = apply_overrides(base, ["masks.num_targets=2", "optim.lr=0.01"])
    assert a == b


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("masks.num_target=3", "masks.num_target"),  # typo'd key
        ("bogus.section=1", "bogus"),
        ("masks.num_targets=many", "masks.num_targets"),  # wrong type
        ("masks.placement=random", "masks.placement"),
        ("ema.start=1.5", "ema.start"),  # out of range
        ("model.arch=vit_gigantic", "model.arch"),
        ("optim.loss=l3", "optim.loss"),
        # these used to validate, then fail inside Ray workers (after their retries) or in
        # MLflow once the whole training had run
        ("masks.min_keep=40", "masks.min_keep"),  # more than the 6x6 grid holds
        ("model.in_chans=3", "model.in_chans"),  # shards are single-channel
        ("optim.betas=[1.5, 0.9]", "optim.betas"),
        ("optim.betas=[0.9, 1.0]", "optim.betas"),
        ("data.crop_ratio=[-1, 1]", "data.crop_ratio"),
        ("data.crop_ratio=[0, 1]", "data.crop_ratio"),
        ("data.crop_scale=[0, 1]", "crop_scale"),
        ("tracking.registered_model=team/radjepa", "tracking.registered_model"),
        ("tracking.registered_model=radjepa:v1", "tracking.registered_model"),
        ("tracking.registered_model=", "tracking.registered_model"),
        ("tracking.experiment=' '", "tracking.experiment"),
        ("tracking.experiment=", "tracking.experiment"),
        # numpy refuses a negative seed (a sweep's draws: traceback), scikit-learn one of
        # 2**32 or more (every probe label "skipped", exit 0)
        ("train.seed=-1", "train.seed"),
        ("probe.seed=-1", "probe.seed"),
        ("probe.seed=4294967296", "probe.seed"),
        ("probe.seeds=0", "probe.seeds"),
        ("probe.seeds=true", "probe.seeds"),
    ],
)
def test_bad_keys_and_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "tiny_cpu.yaml", [override])
    assert key in str(info.value)


@pytest.mark.parametrize("value", ["[0.1]", "[]", "[0.1, 0.2, 0.3]", "0.3"])
def test_a_range_of_the_wrong_shape_says_it_needs_two_values(value):
    # one value read "masks.target_scale.1: Field required" (an empty list said it twice)
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "tiny_cpu.yaml", [f"masks.target_scale={value}"])
    (line,) = str(info.value).splitlines()[1:]
    assert line.strip().startswith("masks.target_scale: needs two values [low, high]")


def test_probe_seeds_may_not_carry_the_last_fold_seed_past_what_scikit_learn_takes():
    """probe.seed=2**32-1 with probe.seeds=2 validated, then the second fold seed reached
    scikit-learn only after the features had been extracted."""
    assert load_config(None, []).probe.seeds == 1  # one seed: today's report
    assert load_config(None, ["probe.seed=4294967294", "probe.seeds=2"]).probe.seeds == 2
    with pytest.raises(ConfigError, match=r"probe.seed \+ probe.seeds - 1 must be at most"):
        load_config(None, ["probe.seed=4294967295", "probe.seeds=2"])


def test_cross_section_check_names_both_keys():
    with pytest.raises(ConfigError, match="model.img_size"):
        load_config(None, ["model.img_size=160"])  # data.crop_size stays 224
    with pytest.raises(ConfigError, match="patch_size"):
        load_config(None, ["model.img_size=230", "data.crop_size=230"])
    # the predictor's sin-cos table needs a multiple of 4: found only in every Train worker
    with pytest.raises(ConfigError, match="pred_width 90 must be a multiple of 4"):
        load_config(None, ["model.pred_width=90", "model.pred_heads=2"])


def test_override_syntax_errors_are_clear():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("masks.num_targets")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("masks..x=1")


def test_masking_ratio_maps_to_target_scales():
    cfg = load_config(None, ["masks.masking_ratio=0.7"])
    assert cfg.masks.target_scale == pytest.approx((0.15, 0.2))
    cfg = load_config(None, ["masks.masking_ratio=0.4", "masks.num_targets=2"])
    assert cfg.masks.target_scale == pytest.approx((0.2 * 6 / 7, 0.2 * 8 / 7))


def test_masking_ratio_and_target_scale_later_layer_wins_same_layer_conflicts(tmp_path):
    # tiny_cpu.yaml inherits an explicit target_scale: an override of the ratio replaces it
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", ["masks.masking_ratio=0.4"])
    assert cfg.masks.target_scale == pytest.approx((0.1 * 6 / 7, 0.1 * 8 / 7))
    # ... and a later target_scale replaces the ratio
    back = cfg.with_overrides({"masks.target_scale": [0.1, 0.12]})
    assert back.masks.masking_ratio is None and back.masks.target_scale == (0.1, 0.12)
    # the ratio survives unrelated overrides
    assert cfg.with_overrides({"train.steps": 3}).masks.masking_ratio == 0.4
    # a YAML layer that sets the ratio over a parent's scale
    (tmp_path / "child.yaml").write_text(
        f"extends: {CONFIGS / 'tiny_cpu.yaml'}\nmasks:\n  masking_ratio: 0.4\n"
    )
    assert load_config(tmp_path / "child.yaml").masks.target_scale == cfg.masks.target_scale
    # both in one layer contradict each other
    with pytest.raises(ConfigError, match="masking_ratio=0.4 and target_scale=.*both set"):
        load_config(None, ["masks.masking_ratio=0.4", "masks.target_scale=[0.1, 0.2]"])
    (tmp_path / "both.yaml").write_text(
        "masks:\n  masking_ratio: 0.4\n  target_scale: [0.1, 0.2]\n"
    )
    with pytest.raises(ConfigError, match="both set"):
        load_config(tmp_path / "both.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", ["masks.masking_ratio=0.5", "train.steps=7"])
    path = tmp_path / "best.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg


def test_search_space_keys_are_dotted_config_keys():
    cfg = load_config(
        None,
        {
            "tune.search_space": {
                "masks.target_scale": {"type": "choice", "values": [[0.1, 0.15], [0.15, 0.2]]}
            }
        },
    )
    assert "masks.target_scale" in cfg.tune.search_space
    with pytest.raises(ConfigError, match="tune.search_space"):
        load_config(None, {"tune.search_space": {"ema.start": {"type": "uniform", "low": 1}}})
    for key in ("masks.num_targetz", "tune.num_samples"):  # typo, or a sweep setting itself
        with pytest.raises(ConfigError, match=f"tune.search_space.{key}: not a config key"):
            load_config(None, {"tune.search_space": {key: {"type": "choice", "values": [1, 2]}}})


def test_a_search_space_the_search_cannot_use_is_refused_at_load():
    # each was accepted: Tune raised the first two only once the sweep had begun (after its
    # MLflow parent run was made), as a traceback; a grid drew one random value of a range
    cases = [
        (
            "random",
            {"optim.weight_decay": {"type": "loguniform", "low": 0, "high": 0.1}},
            "low > 0",
        ),
        ("optuna", {"ema.start": {"type": "grid", "values": [0.99, 0.996]}}, "optuna cannot"),
        ("grid", {"ema.start": {"type": "uniform", "low": 0.99, "high": 0.999}}, "grid cannot"),
        ("grid", {"masks.num_targets": {"type": "randint", "low": 2, "high": 5}}, "grid cannot"),
    ]
    for alg, space, said in cases:
        with pytest.raises(ConfigError, match=said):
            load_config(None, {"tune.search_alg": alg, "tune.search_space": space})
    # what each search can use is still accepted
    load_config(
        None,
        {
            "tune.search_alg": "optuna",
            "tune.search_space": {
                "optim.weight_decay": {"type": "loguniform", "low": 1e-4, "high": 0.1},
                "ema.start": {"type": "choice", "values": [0.99, 0.996]},
            },
        },
    )
    load_config(
        None,
        {
            "tune.search_alg": "grid",
            "tune.search_space": {
                "ema.start": {"type": "choice", "values": [0.99, 0.996]},
                "masks.num_targets": {"type": "grid", "values": [2, 4]},
            },
        },
    )


def test_flatten_gives_dotted_params():
    flat = flatten(load_config())
    assert flat["masks.num_targets"] == 4
    assert flat["model.arch"] == "vit_base"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_gpu_switches_accept_yaml_booleans():
    cfg = load_config(None, ["train.use_gpu=true", "serve.use_gpu=false"])
    assert cfg.train.use_gpu == "true" and cfg.serve.use_gpu == "false"
    assert load_config(None, ["train.use_gpu=auto"]).train.use_gpu == "auto"


def test_configs_load_from_a_uri_with_relative_extends(tmp_path):
    # a sweep on a cluster writes best.yaml to object storage; file:// takes the same path
    sub = tmp_path / "cfgs"
    sub.mkdir()
    (tmp_path / "base.yaml").write_text("train:\n  steps: 11\n")
    (sub / "child.yaml").write_text("extends: ../base.yaml\nmasks:\n  num_targets: 3\n")
    cfg = load_config((sub / "child.yaml").as_uri())
    assert cfg.train.steps == 11 and cfg.masks.num_targets == 3
    with pytest.raises(ConfigError, match="not found: file://"):
        load_config((tmp_path / "nope.yaml").as_uri())
    with pytest.raises(ConfigError, match="cannot read config nosuch://"):
        load_config("nosuch://bucket/best.yaml")
    # extends may itself be a URI, from a local config or a URI one
    (tmp_path / "uri_child.yaml").write_text(f"extends: {(tmp_path / 'base.yaml').as_uri()}\n")
    assert load_config(tmp_path / "uri_child.yaml").train.steps == 11
    # a loop is an error, not a RecursionError traceback
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extend each other in a loop"):
        load_config((tmp_path / "a.yaml").as_uri())
    with pytest.raises(ConfigError, match="extend each other in a loop"):
        load_config(tmp_path / "a.yaml")


def test_unknown_yaml_keys_fail_naming_the_key(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("masks:\n  num_targetz: 3\n")
    with pytest.raises(ConfigError, match="masks.num_targetz"):
        load_config(bad)


@pytest.mark.parametrize(
    "override",
    ["train.steps=true", "optim.lr=false", "optim.grad_clip=true", "optim.betas=[true, 0.9]"],
)
def test_a_boolean_is_not_a_number(override, tmp_path):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=f"{key}: .*boolean"):
        load_config(CONFIGS / "tiny_cpu.yaml", [override])
    section, field = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {field}: {value}\n")
    with pytest.raises(ConfigError, match=f"{key}: .*boolean"):
        load_config(path)
    # real switches still take YAML booleans
    cfg = load_config(None, ["train.compile=true", "masks.allow_overlap=true"])
    assert cfg.train.compile is True and cfg.masks.allow_overlap is True


def test_text_fields_keep_the_text_as_typed():
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", ["train.run_name=123", "data.shards=2024"])
    assert cfg.train.run_name == "123" and cfg.data.shards == "2024"
    assert load_config(None, ["tracking.uri=null"]).tracking.uri is None
    for key in ("train.output_dir", "data.shards", "tracking.uri"):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [f"{key}="])


def test_a_key_given_twice_in_yaml_is_an_error_naming_key_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  steps: 3\nmodel:\n  arch: vit_tiny\ntrain:\n  steps: 5\n")
    with pytest.raises(ConfigError, match="duplicate key 'train' at line 5"):
        load_config(path)
    path.write_text("train:\n  steps: 3\n  steps: 4\n")
    with pytest.raises(ConfigError, match="duplicate key 'steps' at line 3"):
        load_config(path)


def test_a_binary_or_unreadable_config_is_a_config_error(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a UTF-8 text file") as info:
        load_config(path)
    assert "\n" not in str(info.value)
    (tmp_path / "bad.yaml").write_text("train: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "bad.yaml")
    assert "\n" not in str(info.value) and "line 2" in str(info.value)


def test_an_empty_config_file_gives_the_defaults_with_a_warning(tmp_path, caplog):
    # a truncated or blank file silently trained the default model (vit_base)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set yet\n")
    with caplog.at_level(logging.WARNING, logger="radjepa.config"):
        cfg = load_config(empty)
    assert cfg == load_config(None)
    assert any(
        "is empty" in r.getMessage() and str(empty) in r.getMessage() for r in caplog.records
    )
