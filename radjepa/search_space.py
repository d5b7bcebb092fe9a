"""What a sweep's trials can train with, checked before any trial: by ``radjepa sweep`` before
Ray Tune starts, and by ``radjepa config validate`` without Ray.

Each swept key gives candidates (its choices, or a range's ends and a value inside it). Keys
bound each other (``ema.start <= ema.end``), so combinations are checked: every one up to
:data:`MAX_SWEPT_CHECKED`, past that every candidate of every key once and a seeded sample of
the product. A random search over choices runs only the settings :func:`distinct_draws` picks,
so those are what is checked. Both commands check the same settings (they once checked
different ones, and each passed configs the other refused).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, get_args

import numpy as np

from radjepa.config import Config, ConfigError, SearchDim

__all__ = [
    "MAX_SWEPT_CHECKED",
    "distinct_draws",
    "sample_points",
    "swept_candidates",
    "swept_configs",
    "swept_settings",
    "trial_config",
]

# combinations of swept values validated before a sweep: each one validates a whole Config
MAX_SWEPT_CHECKED = 256
# where in a range the value checked besides its ends sits (a fraction: an integer setting
# refuses it, as it refuses Tune's draws)
_INSIDE = 0.382


def _holds_integers(key: str) -> bool:
    """Whether the dotted config ``key`` holds an ``int`` (possibly optional)."""
    model: Any = Config
    annotation: Any = None
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        annotation = model = fields[part].annotation
    kinds = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    return all(kind is int for kind in kinds)


def swept_candidates(key: str, dim: SearchDim) -> list[Any]:
    """The values of one swept key that are checked: its choices, or a range's ends and a
    value inside it (a randint's high is never drawn)."""
    if dim.values:
        return list(dim.values)
    if dim.type == "randint":
        return [int(dim.low or 0), int(dim.high or 0) - 1]
    low, high = float(dim.low or 0), float(dim.high or 0)
    if _holds_integers(key):
        raise ConfigError(
            f"tune.search_space.{key}: '{dim.type}' draws fractions, and {key} takes whole "
            f"numbers: use 'randint' (low {math.ceil(low)}, high {math.floor(high) + 1}) or "
            "'choice'"
        )
    inside = (
        low * (high / low) ** _INSIDE if dim.type == "loguniform" else low + (high - low) * _INSIDE
    )
    return [low, inside, high]


def distinct_draws(cfg: Config) -> list[dict[str, Any]] | None:
    """For a random search whose every dimension is a ``choice``: ``tune.num_samples`` distinct
    settings (all of them when there are fewer), drawn with ``train.seed``.

    Tune draws each trial on its own, with replacement: ``sweep-tiny`` (6 settings, 4 trials)
    repeats a setting in 72% of sweeps, and two trials with one setting and one seed train the
    same model twice, so the sweep compares fewer settings than it pays for. None when a
    dimension is continuous (repeats have probability zero) or the search is grid/optuna.
    """
    space = cfg.tune.search_space
    if cfg.tune.search_alg != "random" or not space:
        return None
    if any(dim.type != "choice" for dim in space.values()):
        return None
    keys = list(space)
    sizes = [len(space[k].values or []) for k in keys]
    rng = np.random.default_rng(cfg.train.seed)
    return [
        {k: (space[k].values or [])[j] for k, j in zip(keys, point, strict=True)}
        for point in sample_points(rng, sizes, cfg.tune.sample_count)
    ]


def sample_points(rng: np.random.Generator, sizes: list[int], n: int) -> list[tuple[int, ...]]:
    """``n`` distinct points of the product of ``sizes`` (each a candidate index per key; all
    of them when ``n`` covers the product), never listing the product: it may be
    astronomically large. One index into the product while it fits numpy's integers (the draws
    sweeps always made), an index per key past that (a flat index past 2**63 raised)."""
    total = math.prod(sizes)
    picked: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(picked) < min(n, total):
        if total < 2**62:
            index, point = int(rng.integers(total)), []
            for size in reversed(sizes):
                index, j = divmod(index, size)
                point.append(j)
            drawn = tuple(reversed(point))
        else:
            drawn = tuple(int(rng.integers(size)) for size in sizes)
        if drawn not in seen:
            seen.add(drawn)
            picked.append(drawn)
    return picked


def swept_settings(cfg: Config, limit: int = MAX_SWEPT_CHECKED) -> list[dict[str, Any]]:
    """The settings of the swept keys that are checked (see the module's docstring)."""
    draws = distinct_draws(cfg)
    if draws is not None:
        return draws
    space = cfg.tune.search_space
    candidates = {key: swept_candidates(key, dim) for key, dim in space.items()}
    sizes = [len(c) for c in candidates.values()]
    if math.prod(sizes) <= limit:
        points = list(itertools.product(*(range(n) for n in sizes)))
    else:  # every candidate of every key at least once, then a seeded sample of the product
        points = [tuple(j % n for n in sizes) for j in range(max(sizes))]
        points += sample_points(np.random.default_rng(cfg.train.seed), sizes, limit)
    return [
        {k: c[j] for (k, c), j in zip(candidates.items(), point, strict=True)}
        for point in dict.fromkeys(points)
    ]


def swept_configs(cfg: Config, limit: int = MAX_SWEPT_CHECKED) -> list[tuple[str, Config]]:
    """Each checked setting in words (``ema.start = 0.99, ...``) and the config its trial
    trains with; a ConfigError naming the setting where one does not validate."""
    return [trial_config(cfg, setting) for setting in swept_settings(cfg, limit)]


def trial_config(cfg: Config, setting: dict[str, Any]) -> tuple[str, Config]:
    """The config a trial with ``setting`` of the swept keys trains with, and the setting in
    words; refused, in those words, where no trial could train with it."""
    said = ", ".join(f"{k} = {v!r}" for k, v in setting.items())
    try:
        return said, cfg.with_overrides(setting)
    except ConfigError as err:
        raise ConfigError(f"tune.search_space: {said}: {err}") from None
