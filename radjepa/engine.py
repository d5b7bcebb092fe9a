"""``Pretrainer``: one JEPA training step in a plain loop (used by the Ray Train job and bench).

One step = schedules at ``step`` -> masks for ``(seed, step, rank)`` -> loss (bf16 autocast on
CUDA, fp32 on CPU) -> AdamW step -> EMA update of the target encoder -> ``step += 1``.
Nothing in :meth:`Pretrainer.train_step` waits for the device: the loss comes back as a 0-d
tensor (the caller decides when to read it) and the scheduled values as python floats.

Masks are drawn by the vectorised sampler on the CPU (``mask_device``) and copied to the images'
device from pinned memory without blocking: the equal-length context cut needs the batch minimum
as a host integer, which on the GPU would be a device sync every step.

``reference_mode=True`` reproduces the reference's choices for benchmarks: manual q@k^T
attention, torch's default AdamW (foreach on CUDA, not fused), GradScaler (CUDA), python-loop
EMA, no compile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, get_args

import torch
from torch import nn

from radjepa.config import CompileScope, Config
from radjepa.ema import ema_update, ema_update_loop
from radjepa.jepa import JEPA
from radjepa.masks import MaskSampler
from radjepa.optim import build_optimizer, set_hparams
from radjepa.schedules import schedule_at

__all__ = ["IntervalLoss", "Pretrainer", "mean_over_ranks"]

log = logging.getLogger(__name__)


def _raise_recompile_limit(graphs: int) -> None:
    """Let dynamo keep ``graphs`` graphs per code object (it falls back to eager beyond)."""
    dyn = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(dyn, name):
            setattr(dyn, name, max(getattr(dyn, name), graphs))


def _say_gpu_only_settings(cfg: Config, device: torch.device) -> None:
    """Warn of the settings that only act on CUDA: asked for explicitly, they were dropped
    without a word, and a run's speed or numerics were not what its config says. Rank 0 only,
    so a run says it once, not once per worker."""
    if cfg.train.precision == "bf16":
        log.warning(
            "train.precision=bf16 is ignored on %s: the step runs in fp32 (bf16 autocast is "
            "used on CUDA only)",
            device,
        )
    if cfg.train.compile:  # reference_mode has turned it off already
        log.warning(
            "train.compile=true is ignored on %s: the step runs eagerly (torch.compile is "
            "used on CUDA only)",
            device,
        )


class Pretrainer:
    """Owns the JEPA model, optimizer, mask sampler and step counter on one device/rank."""

    def __init__(
        self,
        cfg: Config,
        device: torch.device | str,
        rank: int = 0,
        world_size: int = 1,
        *,
        reference_mode: bool = False,
        mask_device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.reference_mode = reference_mode
        if reference_mode:
            cfg = cfg.with_overrides({"model.attention": "manual", "train.compile": False})
        self.cfg = cfg
        self.mask_device = torch.device(mask_device)
        cuda = self.device.type == "cuda"
        self.amp_dtype = (
            torch.bfloat16 if cuda and cfg.train.precision in ("auto", "bf16") else None
        )
        if not cuda and rank == 0:
            _say_gpu_only_settings(cfg, self.device)

        # init from train.seed (identical on every rank) without touching the caller's RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            model = JEPA(cfg)
        self.model = model.to(self.device)
        self.model.train()
        self.sampler = MaskSampler(cfg.masks, cfg.model.grid, seed=cfg.train.seed)
        self.optimizer = build_optimizer(
            [self.model.encoder, self.model.predictor],
            cfg.optim,
            self.device,
            fast=not reference_mode,
        )
        self.scaler = (
            torch.amp.GradScaler("cuda") if reference_mode and self.amp_dtype is not None else None
        )
        self._target_params = list(self.model.target_encoder.parameters())
        self._online_params = list(self.model.encoder.parameters())
        self._encoder: nn.Module = self.model.encoder
        self._predictor: nn.Module = self.model.predictor
        if (
            world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if cuda else None
            self._encoder = DDP(self.model.encoder, device_ids=ids)
            self._predictor = DDP(self.model.predictor, device_ids=ids)
        self._target: nn.Module = self.model.target_encoder
        if cfg.train.compile and cuda and not reference_mode:
            self.compile()
        self.step = 0

    def compile(
        self, backend: str | Callable = "inductor", scope: CompileScope | None = None
    ) -> None:
        """``torch.compile`` the step's three modules (``scope="modules"``) or their blocks.

        With ``masks.context_length="fixed"`` (or ``"per_length"``) every tensor shape is a
        function of the config and the target-block length, which takes a few known values
        (:meth:`MaskSampler.target_lengths`; the context length is one, or one per target
        length): the modules are compiled with static shapes and the recompile limit is raised
        to cover them (the target encoder builds one graph, the online encoder one per distinct
        context length, the predictor one per target length), so after those graphs the step
        never recompiles and CUDA graphs stay possible. Under ``"batch_min"`` the context
        length changes every step and torch's automatic dynamic shapes are used instead.

        ``scope="blocks"`` compiles each transformer block in place instead. The blocks of a
        module are identical code over different weights, so one graph per shape serves all of
        them and the build takes a fraction of the time (what a short GPU lease or a job that
        restarts often cares about), at the price of no fusion across block boundaries. In
        place means every other caller of the modules (evaluation, embeddings) runs the
        compiled blocks too; their extra shapes get a few spare graphs before falling back
        to eager. Default: ``train.compile_scope``.
        """
        scope = scope or self.cfg.train.compile_scope
        if scope not in get_args(CompileScope):
            raise ValueError(f"compile scope must be 'modules' or 'blocks', got {scope!r}")
        keeps = self.sampler.context_keeps
        fixed = keeps is not None
        kwargs: dict[str, Any] = {"backend": backend, "dynamic": False if fixed else None}
        # target encoder 1 + online encoder 1 per context length (dynamic after the first under
        # batch_min) + predictor 1 per target length
        graphs = 1 + (len(set(keeps.values())) if fixed else 1) + len(self.sampler.target_lengths())
        if scope == "modules":
            if fixed:
                _raise_recompile_limit(graphs)
            self._encoder = torch.compile(self._encoder, **kwargs)
            self._predictor = torch.compile(self._predictor, **kwargs)
            self._target = torch.compile(self._target, **kwargs)
            return
        modules = (self.model.encoder, self.model.target_encoder, self.model.predictor)
        blocks = [blk for m in modules for blk in m.blocks]
        # Block.forward is one code object, so its graphs for the online encoder (with grad),
        # the target encoder (no grad) and the predictor share one limit; dynamo also
        # specialises on each block's drop-path rate, which multiplies them by the depth
        per_rate = 1 if self.cfg.model.drop_path == 0 else len(blocks)
        _raise_recompile_limit(graphs * per_rate + 4)
        for blk in blocks:
            blk.compile(**kwargs)

    # -----------------------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, images: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One optimizer step on ``images [B, 1, S, S]`` (model input, on ``device``)."""
        if images.ndim != 4 or images.shape[-1] != self.cfg.model.img_size:
            raise ValueError(
                f"train_step expects [B, 1, {self.cfg.model.img_size}, "
                f"{self.cfg.model.img_size}] crops, got {tuple(images.shape)}"
            )
        sched = schedule_at(self.step, self.cfg)
        set_hparams(self.optimizer, sched.lr, sched.weight_decay)
        masks = self.sampler.sample(images.shape[0], self.step, self.rank, self.mask_device)
        if self.mask_device != self.device:
            if self.device.type == "cuda":
                masks = masks.pin_memory()
            masks = masks.to(self.device, non_blocking=True)

        with self._autocast():
            loss = self.model.loss(images, masks, self._encoder, self._predictor, self._target)
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.cfg.optim.grad_clip
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip is not None:
                self.scaler.unscale_(self.optimizer)
                self._clip(clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if clip is not None:
                self._clip(clip)
            self.optimizer.step()
        update = ema_update_loop if self.reference_mode else ema_update
        update(self._target_params, self._online_params, sched.momentum)
        self.step += 1
        return {
            "loss": loss.detach(),
            "lr": sched.lr,
            "wd": sched.weight_decay,
            "momentum": sched.momentum,
        }

    def _clip(self, max_norm: float) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    @torch.no_grad()
    def target_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Average-pooled TARGET-encoder embeddings ``[B, D]`` (what the method evaluates)."""
        with self._autocast():
            return self.model.target_encoder.embed(images.to(self.device)).float()

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Whether every weight of the encoder, target encoder and predictor is finite.

        Checked before a checkpoint is written: the loss of a step is computed with the weights
        before its update, so a finite loss does not prove the weights saved after it are, and a
        checkpoint of NaN weights would rotate the last good one out (``keep_checkpoints``).
        One norm per tensor, gathered in one host sync; a norm that overflows counts as
        non-finite too (such weights have diverged as surely)."""
        params = [
            p
            for m in (self.model.encoder, self.model.target_encoder, self.model.predictor)
            for p in m.parameters()
        ]
        norms = torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in params])
        return bool(torch.isfinite(norms).all())

    # -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resume restores exactly: weights, optimizer state, step (hence the LR, weight
        decay and EMA schedules) and the mask seed (which a checkpoint only records:
        :func:`~radjepa.checkpoint.load_checkpoint` keeps the trainer's train.seed). The data
        order and the crop RNG are not here: the training job restarts them from the resume
        step, so a resumed run sees other batches than an uninterrupted one would and is not
        bit-identical to it."""
        return {
            "encoder": self.model.encoder.state_dict(),
            "target_encoder": self.model.target_encoder.state_dict(),
            "predictor": self.model.predictor.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "mask_sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Strict restore (a missing or unexpected key is an error)."""
        self.model.encoder.load_state_dict(state["encoder"], strict=True)
        self.model.target_encoder.load_state_dict(state["target_encoder"], strict=True)
        self.model.predictor.load_state_dict(state["predictor"], strict=True)
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if "mask_sampler" in state:
            self.sampler.load_state_dict(state["mask_sampler"])


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """A per-rank 0-d tensor averaged over the process group (itself without one): the logged
    loss is the whole global batch's, not rank 0's share of it. SUM then divide, since gloo
    (CPU workers) has no AVG."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


class IntervalLoss:
    """The training loss averaged over the steps since it was last taken, and over the ranks.

    One step's loss swings with the sizes of its random target blocks: logged alone every
    ``train.log_every`` steps, it sampled that noise and hid the fall-then-rise of a partial
    collapse. Summed where the loss lives, so the steps between logs add no host sync."""

    def __init__(self, device: torch.device | str) -> None:
        self._sum = torch.zeros((), dtype=torch.float32, device=device)
        self._steps = 0

    def add(self, loss: torch.Tensor) -> None:
        """Count one step's loss (a 0-d tensor)."""
        self._sum += loss.detach().float()
        self._steps += 1

    def take(self) -> torch.Tensor:
        """The mean since the last take over every rank (a collective: every rank calls it at
        the same step), and start the next interval."""
        if self._steps == 0:
            raise RuntimeError("no training step since the loss was last taken")
        mean = mean_over_ranks(self._sum / self._steps)
        self._sum.zero_()
        self._steps = 0
        return mean
