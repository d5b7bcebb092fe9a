"""Ray Train's failure policy, less the retries a full storage cannot use.

Ray Train (pinned 2.60) retries every worker-group failure ``train.max_failures`` times and
takes no policy from its public config; the trainer builds its default one in ``fit()`` and
hands it to the controller actor. :class:`Trainer` hands over :class:`StopOnFullStorage`
instead: the same decisions, except that a worker group that failed on a full, over-quota or
read-only storage, or on a damaged shard (:func:`pipelines.storage_errors.is_not_retryable`),
is not retried. Imported
by the driver only when it builds a trainer (this module imports Ray).
"""

from __future__ import annotations

import logging

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import (
    DefaultFailurePolicy,
    FailureDecision,
)
from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

from pipelines.storage_errors import is_not_retryable

log = logging.getLogger(__name__)


class StopOnFullStorage(DefaultFailurePolicy):
    """Ray's default policy, but a worker group that failed on a storage no retry can write to
    is raised at once (a controller's own storage error already is: Ray retries only its
    start-up failures)."""

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if isinstance(training_failed_error, WorkerGroupError) and is_not_retryable(
            training_failed_error
        ):
            log.error(
                "a worker failed on a full, over-quota or read-only storage, or a damaged "
                "shard: no retry (train.max_failures=%s is for transient failures)",
                self.failure_config.max_failures,
            )
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class Trainer(TorchTrainer):
    """A TorchTrainer whose controller decides failures with :class:`StopOnFullStorage`."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if "failure_policy" in controller_init_kwargs:  # Ray's own name (2.60)
            policy = StopOnFullStorage(self.run_config.failure_config)
            controller_init_kwargs["failure_policy"] = policy
        else:  # a Ray that names it otherwise: its own retries, said rather than silent
            log.warning(_NO_HOOK, "takes no failure_policy")
        return super()._initialize_and_run_controller(**controller_init_kwargs)


_NO_HOOK = (
    "this Ray's trainer %s: a full disk will be retried train.max_failures times "
    "(pipelines.failure_policy fits Ray Train v2 as of 2.60)"
)
if not hasattr(TorchTrainer, "_initialize_and_run_controller"):  # Ray Train v1 (V2 disabled)
    log.warning(_NO_HOOK, "has no _initialize_and_run_controller")
