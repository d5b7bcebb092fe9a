"""How Ray Tune draws, schedules and stops a sweep's trials.

Everything here is a Tune object or what builds one from the config: the search space keyed by
dotted config keys, the searcher (Optuna told that a diverged trial scored worst, the distinct
draws of an all-choice random search, or Tune's variant generator seeded with ``train.seed``),
ASHA with rungs in training steps, the stopper that ends a trial whose embeddings collapsed, and
the callback that frees the resources of trials Tune stopped. What a trial runs, and how the
finished trials are ranked, is in :mod:`pipelines.sweep`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from pipelines.divergence import DIVERGED
from pipelines.placement_groups import release_orphaned_placement_groups
from radjepa.config import Config, SearchDim
from radjepa.search_space import distinct_draws


def search_space(dims: dict[str, SearchDim], alg: str) -> dict[str, Any]:
    """Tune's param space keyed by dotted config keys (grid dims become grid_search)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, dim in dims.items():
        if dim.type == "grid" or (alg == "grid" and dim.type == "choice"):
            space[key] = tune.grid_search(list(dim.values or []))
        elif dim.type == "choice":
            space[key] = tune.choice(list(dim.values or []))
        elif dim.type == "uniform":
            space[key] = tune.uniform(dim.low, dim.high)
        elif dim.type == "loguniform":
            space[key] = tune.loguniform(dim.low, dim.high)
        else:
            space[key] = tune.randint(int(dim.low), int(dim.high))
    return space


def is_collapsed(metrics: dict[str, Any], rankme_floor: float, std_floor: float) -> bool:
    """Collapse as the monitors show it: effective rank near 1 (every image maps to a few
    directions) or per-dimension spread near 0 (every image maps to one point)."""
    rk, std = metrics.get("rankme"), metrics.get("feature_std")
    return (rk is not None and rk < rankme_floor) or (std is not None and std < std_floor)


class CollapseStopper(Stopper):
    """Stop a trial whose embeddings collapsed: more steps cannot rescue it, and its slot is
    better spent on another configuration."""

    def __init__(self, rankme_floor: float, std_floor: float) -> None:
        self.floors = (rankme_floor, std_floor)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return is_collapsed(result, *self.floors)

    def stop_all(self) -> bool:
        return False


class FreeStoppedTrials(Callback):
    """Frees, every few seconds of the sweep, the resources of trials Tune stopped (see
    :mod:`pipelines.placement_groups`): without it a local sweep with ASHA or the collapse
    stopper waited forever once stopped trials held the CPUs a new trial needed."""

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self.last = 0.0

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            release_orphaned_placement_groups()


class DrawnSettings(Searcher):
    """Hands out settings drawn beforehand, one per trial (see :func:`distinct_draws`).

    Tune's variant generator cannot take them as its first points: it reads a list value, such
    as a ``masks.target_scale`` pair, as a path into the search space and fails.
    """

    def __init__(self, draws: list[dict[str, Any]]) -> None:
        super().__init__()
        self.draws = draws
        self.handed = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec):
        return True  # the space was sampled up front; every key of it is in each draw

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.handed >= len(self.draws):
            return Searcher.FINISHED
        self.handed += 1
        return dict(self.draws[self.handed - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        pass  # nothing adapts: the draws are fixed

    def get_state(self) -> dict[str, Any]:
        return {"draws": self.draws, "handed": self.handed}

    def set_state(self, state: dict[str, Any]) -> None:
        self.draws, self.handed = state["draws"], state["handed"]

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(json.loads(Path(checkpoint_path).read_text()))


class DivergedIsWorst(OptunaSearch):
    """Optuna, told that a diverged trial scored the worst value there is.

    A diverged trial's last report carries a NaN metric (the worker reports it as it stops;
    Tune and ASHA let it end there). Optuna refuses NaN in ``tell`` ("The value nan is not
    acceptable", a warning), so the trial stayed RUNNING in the study, and TPE, which learns
    from finished trials only, never learned that the region diverges. Told PRUNED instead
    (what Tune's OptunaSearch does for a result without the metric), TPE would rank it by its
    step among the pruned trials: one diverging late ranked ahead of trials ASHA cut early and
    could land in TPE's "good" group. So Optuna alone is told the trial completed at -inf
    (+inf when minimising), which it accepts and TPE sorts after every finite value; Tune and
    ASHA still see NaN, so the trial ends itself and tags its MLflow run diverged (an -inf
    there made ASHA stop the trial before it could)."""

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if result and result.get(DIVERGED) and not error:
            worst = -math.inf if self.mode == "max" else math.inf
            result = {**result, self.metric: worst}
        super().on_trial_complete(trial_id, result, error)


def tune_searcher(cfg: Config, metric: str, mode: str):
    """Optuna (:class:`DivergedIsWorst`); for an all-choice random search, the distinct draws;
    else Tune's variant generator seeded with ``train.seed`` (its default draws from numpy's
    global state, so reruns of one sweep tried different settings)."""
    if cfg.tune.search_alg == "optuna":
        return DivergedIsWorst(metric=metric, mode=mode, seed=cfg.train.seed)
    draws = distinct_draws(cfg)
    if draws is not None:
        return DrawnSettings(draws)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # a generator takes its concurrency cap itself: Tune ignores max_concurrent_trials for one
    return BasicVariantGenerator(
        max_concurrent=cfg.tune.max_concurrent, random_state=cfg.train.seed
    )


def tune_scheduler(cfg: Config, metric: str, mode: str) -> Any:
    """ASHA (None without ``tune.asha``), with rungs in training steps, which a trial resumed
    after a failure continues (Tune's own iteration count would restart at 1 and compare
    metrics of different steps)."""
    if not cfg.tune.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    every = cfg.train.checkpoint_every
    max_t = max(every, _most_steps(cfg))
    return ASHAScheduler(
        time_attr="step",
        metric=metric,
        mode=mode,
        max_t=max_t,
        grace_period=min(cfg.tune.grace_period * every, max_t),
    )


def _most_steps(cfg: Config) -> int:
    """The most training steps a trial can get: the base ``train.steps``, or the largest the
    search space gives it. ASHA stops every trial at its ``max_t``: set from the base count,
    a trial swept to more steps was cut there, marked stopped early and ranked after every
    trial that finished, and ``best.yaml`` could prescribe a step count no trial trained."""
    dim = cfg.tune.search_space.get("train.steps")
    if dim is None:
        return cfg.train.steps
    if dim.values:
        return max(int(v) for v in dim.values)
    # randint draws from [low, high); a continuous range over it is refused (sweep._check_space)
    return int(dim.high or 0) - 1 if dim.type == "randint" else math.floor(dim.high or 0)
