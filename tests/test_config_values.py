"""Values the schema must refuse (or take) the same way from a YAML file and from ``--set``,
and the one-line errors it gives for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from radjepa.config import Config, ConfigError, config_to_yaml, load_config
from radjepa.locations import redact, redact_strings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _error_lines(path: Path | None = None, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [])
    head, *lines = str(info.value).splitlines()
    assert head == "invalid configuration:"
    return [line.strip() for line in lines]


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("masks.target_aspect=[.nan,.nan]", "masks.target_aspect: low must be a finite number"),
        ("masks.target_aspect=[0.75,.inf]", "masks.target_aspect: high must be a finite number"),
        ("masks.context_aspect=[1,.inf]", "masks.context_aspect: high must be a finite number"),
        ("data.crop_ratio=[.nan,1]", "data.crop_ratio: low must be a finite number, got nan"),
        ("optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
        ("optim.weight_decay=.inf", "optim.weight_decay: must be a finite number, got inf"),
        ("tune.collapse_rankme=.inf", "tune.collapse_rankme: must be a finite number"),
        ("ingest.max_file_mb=.inf", "ingest.max_file_mb: must be a finite number"),
        ("serve.request_timeout_s=.inf", "serve.request_timeout_s: must be a finite number"),
        ("optim.grad_clip=.nan", "optim.grad_clip: must be a finite number, got nan"),
    ],
)
def test_inf_and_nan_are_refused_naming_the_key(override, line, tmp_path):
    # each validated, and pretrain then died drawing masks (OverflowError) or trained on nan
    assert _error_lines(CONFIGS / "tiny_cpu.yaml", [override])[0].startswith(line)
    key, value = override.split("=")
    section, field = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"extends: {CONFIGS / 'tiny_cpu.yaml'}\n{section}:\n  {field}: {value}\n")
    assert _error_lines(path)[0].startswith(line)


def test_serve_replicas_are_at_least_one_or_auto_said_in_one_line():
    for value in ("0", "-2"):
        # one line naming the key and its forms, not one per union branch under invented
        # keys ("serve.num_replicas.int", "serve.num_replicas.literal['auto']")
        assert _error_lines(None, [f"serve.num_replicas={value}"]) == [
            f"serve.num_replicas: expected a whole number >= 1 or 'auto', got {value}"
        ]
    assert _error_lines(None, ["serve.num_replicas=many"]) == [
        "serve.num_replicas: expected a whole number >= 1 or 'auto', got 'many'"
    ]
    assert load_config(None, ["serve.num_replicas=auto"]).serve.num_replicas == "auto"
    # a boolean is no count (pydantic reads true as 1): the bound must not hide that check
    assert _error_lines(None, ["serve.num_replicas=true"]) == [
        "serve.num_replicas: expected a number, got the boolean True"
    ]
    # a fixed count does not autoscale: max_replicas (the ceiling of 'auto') does not bound it
    assert load_config(None, ["serve.num_replicas=6"]).serve.num_replicas == 6


def test_a_check_s_message_has_no_pydantic_prefix():
    assert _error_lines(None, ["ema.start=0.999", "ema.end=0.99"]) == [
        "ema: ema.start must be <= ema.end"
    ]
    # a check across sections names its keys itself
    assert _error_lines(None, ["model.img_size=160"]) == [
        "data.crop_size (224) must equal model.img_size (160): the encoder is trained on the crops"
    ]


def test_text_fields_read_the_same_from_yaml_as_from_set(tmp_path):
    # YAML reads these as a date and numbers, which the text fields refused ("Input should be
    # a valid string"), while --set kept them as typed
    given = {
        "train.run_name": "2025-01-15",
        "tune.name": "123",
        "data.shards": "2024",
        "tracking.experiment": "1.5",
    }
    # and as typed, not as YAML reads the number: 0012 is octal 10, 2025_01 is 202501, 1.0e-3
    # is 0.001 (a run name turned into text again was another name than the one written)
    given |= {
        "tracking.registered_model": "0012",
        "serve.model": "2025_01",
        "train.output_dir": "1.0e-3",
    }
    path = tmp_path / "c.yaml"
    path.write_text(
        f"extends: {CONFIGS / 'tiny_cpu.yaml'}\n"
        + "".join(
            f"{section}:\n"
            + "".join(
                f"  {k.split('.')[1]}: {v}\n" for k, v in given.items() if k.startswith(section)
            )
            for section in dict.fromkeys(k.split(".")[0] for k in given)
        )
    )
    from_file = load_config(path)
    from_set = load_config(CONFIGS / "tiny_cpu.yaml", [f"{k}={v}" for k, v in given.items()])
    assert from_file == from_set
    assert from_file.train.run_name == "2025-01-15" and from_file.tune.name == "123"
    assert from_file.serve.model == "2025_01" and from_file.train.output_dir == "1.0e-3"
    assert from_file.tracking.registered_model == "0012"
    # a number field still takes no boolean
    path.write_text("train:\n  steps: true\n")
    assert _error_lines(path)[0].startswith("train.steps: expected a number")


def test_text_fields_read_yaml_booleans_and_null_as_set_does(tmp_path):
    # YAML reads off, no and true as booleans and null as None, which the text fields refused
    # ("Input should be a valid string") while --set kept the text typed
    given = {
        "train.run_name": "off",
        "tracking.experiment": "no",
        "tune.name": "True",
        "tracking.registered_model": "null",
        "ingest.secret_env": "~",
    }
    path = tmp_path / "c.yaml"
    path.write_text(
        "".join(
            f"{section}:\n"
            + "".join(
                f"  {k.split('.')[1]}: {v}\n" for k, v in given.items() if k.startswith(section)
            )
            for section in dict.fromkeys(k.split(".")[0] for k in given)
        )
    )
    from_file = load_config(path)
    assert from_file == load_config(None, [f"{k}={v}" for k, v in given.items()])
    assert from_file.train.run_name == "off" and from_file.tracking.experiment == "no"
    assert from_file.tune.name == "True" and from_file.tracking.registered_model == "null"
    assert from_file.ingest.secret_env == "~"
    # an optional text field's null is still None, from a file as from --set
    path.write_text("serve:\n  model: null\n  head: ~\n  index: off\n")
    cfg = load_config(path)
    assert cfg.serve.model is None and cfg.serve.head is None and cfg.serve.index == "off"
    assert cfg == load_config(None, ["serve.model=null", "serve.head=~", "serve.index=off"])


def test_extends_takes_one_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("extends: [a.yaml]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: extends takes one config file (a path or URI), got ['a.yaml']"
    )


def test_an_extended_file_not_found_is_said_with_the_config_naming_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../missing.yaml\n")
    path = tmp_path / "ext.yaml"
    path.write_text("extends: sub/mid.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # still "config file not found: ..." first, which submit lets pass for a file it extends
    # (it may be on the cluster's nodes)
    assert str(info.value) == (
        f"config file not found: {tmp_path / 'missing.yaml'} "
        f"(named by {tmp_path / 'sub' / 'mid.yaml'}: extends: ../missing.yaml)"
    )
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert str(info.value) == f"config file not found: {tmp_path / 'nope.yaml'}"


def test_sweep_labels_are_refused_where_the_metric_does_not_use_them_or_needs_them(tmp_path):
    # config validate said ok to a supervised metric without labels, and the sweep stopped
    # only once it had read the shards; labels under RankMe (label-free) were ignored in silence
    base = CONFIGS / "sweep-tiny.yaml"
    needs = "needs tune.labels_csv and tune.label_column (the labelled images and the label it "
    assert _error_lines(base, ["tune.metric=probe_auroc"]) == [
        f"tune.metric: probe_auroc {needs}ranks trials on): set tune.labels_csv and "
        "tune.label_column"
    ]
    assert _error_lines(base, ["tune.metric=knn_auroc", "tune.labels_csv=l.csv"]) == [
        f"tune.metric: knn_auroc {needs}ranks trials on): set tune.label_column"
    ]
    unused = (
        ": used only by tune.metric=knn_auroc or probe_auroc (which rank trials on the labels), "
        "and tune.metric is rankme (label-free): set tune.metric to one of those, or leave the "
        "labels out"
    )
    assert _error_lines(base, ["tune.label_column=male"]) == [f"tune.label_column{unused}"]
    path = tmp_path / "c.yaml"
    path.write_text("tune:\n  labels_csv: l.csv\n  label_column: male\n")
    assert _error_lines(path) == [f"tune.labels_csv and tune.label_column{unused}"]
    cfg = load_config(path, ["tune.metric=knn_auroc"])
    assert (cfg.tune.labels_csv, cfg.tune.label_column) == ("l.csv", "male")
    # a checkpoint's config is validated again when it is loaded: one written with labels
    # under RankMe, which an earlier version took, still loads
    stored = cfg.model_dump(mode="json")
    stored["tune"]["metric"] = "rankme"
    assert Config.model_validate(stored).tune.label_column == "male"


def test_a_mapping_set_on_a_swept_key_is_its_whole_dimension():
    base = CONFIGS / "sweep-tiny.yaml"
    cfg = load_config(base, ["tune.search_space.masks.num_targets={type: choice, values: [2,4]}"])
    dim = cfg.tune.search_space["masks.num_targets"]
    assert dim.type == "choice" and dim.values == [2, 4]
    assert "masks" not in cfg.tune.search_space  # it was split at the last dot
    # a field of a dimension is still set on its own
    cfg = load_config(base, ["tune.search_space.ema.start.values=[0.9, 0.95]"])
    assert cfg.tune.search_space["ema.start"].values == [0.9, 0.95]


def test_a_config_saved_from_config_show_is_refused_until_its_credential_is_back(tmp_path):
    cfg = load_config(
        CONFIGS / "tiny_cpu.yaml",
        ["tracking.uri=postgresql://bob:pw@db/mlflow", "data.shards=s3://b/s?secret_key=k1"],
    )
    path = tmp_path / "shown.yaml"
    path.write_text(redact(config_to_yaml(cfg)))  # what `radjepa config show` prints
    lines = _error_lines(path)
    assert [line.split(":")[0] for line in lines] == ["data.shards", "tracking.uri"]
    assert all("radjepa config show" in line for line in lines)
    # the same config with its credentials validates, and a *** elsewhere is no placeholder
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg
    assert load_config(None, ["train.output_dir=runs/***"]).train.output_dir == "runs/***"
    # a checkpoint keeps its config redacted and validates it again when loaded
    saved = redact_strings(cfg.model_dump(mode="json"))
    assert Config.model_validate(saved).tracking.uri == "postgresql://bob:***@db/mlflow"


def test_swept_configs_are_every_setting_a_trial_can_get():
    from radjepa.search_space import distinct_draws, swept_configs

    drawn = load_config(CONFIGS / "sweep-tiny.yaml")  # random over choices: what it draws
    assert [c for _, c in swept_configs(drawn)] == [
        drawn.with_overrides(d) for d in distinct_draws(drawn) or []
    ]
    cfg = drawn.with_overrides({"tune.search_alg": "grid", "tune.num_samples": None})
    settings = swept_configs(cfg)
    assert len(settings) == 3 * 2
    assert {c.ema.start for _, c in settings} == {0.99, 0.996}
    bad = cfg.with_overrides(['tune.search_space.ema.start.values=[0.99, 1.5, "abc"]'])
    with pytest.raises(ConfigError) as info:
        swept_configs(bad)
    assert str(info.value).startswith(
        "tune.search_space: masks.target_scale = [0.1, 0.15], ema.start = 1.5: invalid "
        "configuration:\n  ema.start: Input should be less than or equal to 1"
    )
    # a range over a whole-number setting draws fractions no trial can take
    ints = drawn.with_overrides(
        {"tune.search_space": {"masks.num_targets": {"type": "uniform", "low": 2, "high": 4}}}
    )
    with pytest.raises(ConfigError, match="masks.num_targets: 'uniform' draws fractions"):
        swept_configs(ints)
    # past the limit each candidate is still checked once
    many = cfg.with_overrides(
        {
            "tune.search_space": {
                "ema.start": {"type": "choice", "values": [0.9, 0.91, 0.92, 1.5]},
                "optim.lr": {"type": "choice", "values": [1e-3, 2e-3]},
            }
        }
    )
    with pytest.raises(ConfigError, match="ema.start = 1.5"):
        swept_configs(many, limit=2)
