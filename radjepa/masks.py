"""Multi-block masks (I-JEPA semantics), sampled for a whole batch at once with torch ops.

Per batch (as in the method) one target block size and one context block size are drawn:
a block of scale ``s ~ U(scale)`` and aspect ``a ~ U(aspect)`` (a = height / width) on a
``gh x gw`` patch grid is ``h = round(sqrt(s*gh*gw*a))`` by ``w = round(sqrt(s*gh*gw/a))``
patches (clipped to the grid). Each image then gets its own positions for ``num_targets`` target
blocks and one context block; target patches are removed from the context unless
``allow_overlap``; an image whose context keeps fewer than ``min_keep`` patches is redrawn.

Differences from the reference collator, on purpose:
- Positions (``placement``): by default (``"uniform"``, the method) each block's top-left corner
  is uniform over every valid position ``[0, gh-h]``, the last one included (the reference's
  upper bound left it out, so the last row and column were never a target). ``"clipped"``
  draws it from ``[-(h-1), gh-1]`` and clips it into ``[0, gh-h]``, which piles ``h-1`` extra
  draws onto each edge: border patches are then covered about as often as central ones
  (max/min coverage < 3x on 14x14, vs ~35x), at the price of most blocks touching the border.
- Equal lengths: all target blocks of a batch have the same size, so ``h*w`` indices each, no
  trimming. Context sets differ in size and are cut to one length by a uniformly random subset
  of each image's context (the reference kept the first k in raster order, which starved the
  bottom/right of context). The length is fixed by the config (``context_length="fixed"``, one
  ``Kc``, or ``"per_length"``, one per target length ``Kt``: images with a smaller context are
  redrawn, so a compiled step sees static shapes) or, as in the method, the batch minimum
  (``"batch_min"``); see :func:`fixed_context_lengths`.
- Determinism without global state: each batch's generator is derived from ``(seed, step,
  rank)``, so a resumed run (same seed, same step) draws the same masks and DDP ranks differ.

``MaskBatch.context`` is ``LongTensor[B, Kc]`` (sorted ascending) and ``MaskBatch.targets`` is
``LongTensor[B, T, Kt]`` (row-major within each block); indices are into the row-major grid.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from radjepa.config import Config, MasksConfig

__all__ = [
    "MaskBatch",
    "MaskSampler",
    "MasksUnsatisfiable",
    "block_size",
    "check_masks",
    "derive_seed",
    "fixed_context_lengths",
]

log = logging.getLogger(__name__)


class MasksUnsatisfiable(RuntimeError):
    """The mask section cannot keep its context on this grid (phrased with the keys to change).

    Schema validation cannot see it: it depends on the block sizes the sampler draws."""


@dataclass(frozen=True)
class MaskBatch:
    """Context ``[B, Kc]`` and target ``[B, T, Kt]`` patch indices for one batch."""

    context: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskBatch:
        return MaskBatch(
            self.context.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> MaskBatch:
        return MaskBatch(self.context.pin_memory(), self.targets.pin_memory())


def derive_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit generator seed that is a pure function of (seed, step, rank)."""
    digest = hashlib.blake2b(f"radjepa-masks:{seed}:{step}:{rank}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def block_size(scale: float, aspect: float, gh: int, gw: int) -> tuple[int, int]:
    """Block ``(h, w)`` in patches for an area fraction ``scale`` and aspect ``h / w``."""
    n = scale * gh * gw
    h = int(round(math.sqrt(n * aspect)))
    w = int(round(math.sqrt(n / aspect)))
    return min(max(h, 1), gh), min(max(w, 1), gw)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    u = torch.rand((), generator=g, device=g.device).item()
    return lo + (hi - lo) * u


def _starts(
    g: torch.Generator,
    shape: tuple[int, ...],
    size: int,
    extent: int,
    placement: str,
    device: torch.device,
) -> torch.Tensor:
    """Block starts in ``[0, extent-size]`` under ``placement`` (see the module doc)."""
    if placement == "uniform":
        return torch.randint(0, extent - size + 1, shape, generator=g, device=device)
    raw = torch.randint(-(size - 1), extent, shape, generator=g, device=device)
    return raw.clamp_(0, extent - size)


def _block_mask(
    top: torch.Tensor, left: torch.Tensor, h: int, w: int, gh: int, gw: int
) -> torch.Tensor:
    """Boolean masks ``[..., gh, gw]`` of blocks at ``top``/``left`` (shape ``[...]``)."""
    rows = torch.arange(gh, device=top.device)
    cols = torch.arange(gw, device=top.device)
    in_r = (rows >= top[..., None]) & (rows < top[..., None] + h)  # [..., gh]
    in_c = (cols >= left[..., None]) & (cols < left[..., None] + w)  # [..., gw]
    return in_r[..., :, None] & in_c[..., None, :]


@dataclass(frozen=True)
class _Layout:
    """One batch's blocks: target corners ``[B, T]`` of size ``th x tw``, the context
    ``[B, gh*gw]`` (bool, targets already removed) and its size per image ``[B]``."""

    tops: torch.Tensor
    lefts: torch.Tensor
    th: int
    tw: int
    context: torch.Tensor
    counts: torch.Tensor

    def target_indices(self, gw: int) -> torch.Tensor:
        """Row-major patch indices of every target block, ``[B, T, th*tw]``."""
        r = torch.arange(self.th, device=self.tops.device)
        q = torch.arange(self.tw, device=self.tops.device)
        rows = self.tops[..., None, None] + r[:, None]  # [B, T, th, 1]
        cols = self.lefts[..., None, None] + q[None, :]  # [B, T, 1, tw]
        b, t = self.tops.shape
        return (rows * gw + cols).reshape(b, t, self.th * self.tw)


def _host_twin(g: torch.Generator) -> torch.Generator:
    """A CPU generator seeded from a device generator's seed (no device round-trip)."""
    h = torch.Generator()
    h.manual_seed(g.initial_seed())
    return h


_FIXED_LENGTHS: dict[tuple[str, int, int], Mapping[int, int]] = {}
_PROBE_BATCHES = 64  # per_length: 64 batches of 128 images per length, each its own sizes
_PROBE_BATCH = 128


def _probe_generator(kt: int) -> torch.Generator:
    g = torch.Generator()
    digest = hashlib.blake2b(f"radjepa-masks-probe:{kt}".encode(), digest_size=8)
    g.manual_seed(int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1))
    return g


def fixed_context_lengths(cfg: MasksConfig, grid: tuple[int, int]) -> Mapping[int, int]:
    """The context length ``Kc`` of a batch, by its target length ``Kt``, under
    ``context_length="fixed"`` (one ``Kc`` for every ``Kt``) or ``"per_length"``.

    A pure function of the mask section and the grid (every rank, resumed run and sweep trial
    with the same config agrees), from a fixed seed, never below ``min_keep``, cached per
    config: the ``context_quantile`` quantile of the per-image context size.

    ``"fixed"`` takes it over every block size at once (16384 images, 128 batches of their own
    sizes): a compiled step then builds one online-encoder graph. The images redrawn for a
    context below it come from the batches with the largest target blocks (about a fifth of
    their images with the defaults, none of the smallest blocks'), whose kept layouts then
    have targets that overlap more. ``"per_length"`` takes it per ``Kt`` (8192 images each,
    every target shape of that length as often as the ranges draw it): each length redraws
    about ``context_quantile`` of its images, at the price of one online-encoder graph per
    distinct ``Kc`` (7 on 14x14 with the defaults) when compiled. Estimating those lengths
    draws every target size, so a size that cannot keep ``min_keep`` raises
    :class:`MasksUnsatisfiable` here, before any step draws it.
    """
    gh, gw = grid
    key = (cfg.model_dump_json(), gh, gw)
    if key not in _FIXED_LENGTHS:
        probe = MaskSampler(cfg.model_copy(update={"context_length": "batch_min"}), grid)
        if cfg.context_length == "per_length":
            lengths = {
                kt: _quantile_length(cfg, _per_length_counts(probe, kt, shapes, weights))
                for kt, (shapes, weights) in sorted(probe._target_shapes().items())
            }
        else:
            g = torch.Generator()
            g.manual_seed(derive_seed(0, 0, 0))
            counts = []
            for _ in range(128):
                target, context = probe._block_sizes(g)
                lay = probe._layout(g, 128, torch.device("cpu"), cfg.min_keep, target, context)
                counts.append(lay.counts)
            kc = _quantile_length(cfg, torch.cat(counts))
            lengths = {kt: kc for kt in probe.target_lengths()}
        _FIXED_LENGTHS[key] = MappingProxyType(lengths)
        log.debug("fixed context lengths %s for %s on %dx%d", lengths, cfg, gh, gw)
    return _FIXED_LENGTHS[key]


def _per_length_counts(
    probe: MaskSampler, kt: int, shapes: list[tuple[int, int]], weights: torch.Tensor
) -> torch.Tensor:
    """Per-image context sizes of ``_PROBE_BATCHES`` batches whose target blocks have ``kt``
    patches."""
    g = _probe_generator(kt)
    counts = []
    for _ in range(_PROBE_BATCHES):
        target = shapes[int(torch.multinomial(weights, 1, generator=g))]
        context = probe._context_size(g)
        lay = probe._layout(
            g, _PROBE_BATCH, torch.device("cpu"), probe.cfg.min_keep, target, context
        )
        counts.append(lay.counts)
    return torch.cat(counts)


def _quantile_length(cfg: MasksConfig, counts: torch.Tensor) -> int:
    q = torch.quantile(counts.float(), cfg.context_quantile, interpolation="lower")
    return max(cfg.min_keep, int(q))


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _reachable_sizes(
    scale: tuple[float, float], aspect: tuple[float, float], gh: int, gw: int
) -> set[tuple[int, int]]:
    """Every ``(h, w)`` that :func:`block_size` returns for some scale and aspect in the ranges.

    In log space, with ``u = log(s*N*a)`` and ``v = log(s*N/a)`` (the squares of the unrounded
    h and w), a block size is the rectangle of (u, v) that rounds to it (unbounded at the grid
    clip), and the ranges are the rectangle ``u + v in 2*log(s*N)``, ``u - v in 2*log(a)``
    turned by 45 degrees. Two convex shapes meet unless one of their four edge directions
    separates them, so each size is four interval tests.
    """
    n = gh * gw
    su = (2 * math.log(scale[0] * n), 2 * math.log(scale[1] * n))  # range of u + v
    sv = (2 * math.log(aspect[0]), 2 * math.log(aspect[1]))  # range of u - v
    # the ranges' rectangle projected onto the u and v axes
    u_rng = ((su[0] + sv[0]) / 2, (su[1] + sv[1]) / 2)
    v_rng = ((su[0] - sv[1]) / 2, (su[1] - sv[0]) / 2)

    def cell(k: int, top: int) -> tuple[float, float]:  # u (or v) that rounds to k, clipped
        lo = -math.inf if k == 1 else 2 * math.log(k - 0.5)
        hi = math.inf if k == top else 2 * math.log(k + 0.5)
        return lo, hi

    out = set()
    for h in range(1, gh + 1):
        hu = cell(h, gh)
        for w in range(1, gw + 1):
            wv = cell(w, gw)
            if (
                _overlap(hu, u_rng)
                and _overlap(wv, v_rng)
                and _overlap((hu[0] + wv[0], hu[1] + wv[1]), su)
                and _overlap((hu[0] - wv[1], hu[1] - wv[0]), sv)
            ):
                out.add((h, w))
    return out


class MaskSampler:
    """Draws :class:`MaskBatch` es for a ``grid`` of patches under ``cfg`` (see module doc)."""

    def __init__(
        self, cfg: MasksConfig, grid: int | tuple[int, int], seed: int = 0, max_tries: int = 100
    ) -> None:
        self.cfg = cfg
        self.gh, self.gw = (grid, grid) if isinstance(grid, int) else grid
        self.seed = int(seed)
        self.max_tries = max_tries
        self._context_keeps: Mapping[int, int] | None = None
        if cfg.min_keep > self.gh * self.gw:
            raise ValueError(
                f"masks.min_keep={cfg.min_keep} exceeds the {self.gh}x{self.gw} patch grid"
            )

    def generator(
        self, step: int, rank: int = 0, device: torch.device | str = "cpu"
    ) -> torch.Generator:
        """The generator of batch ``step`` on ``rank`` (a pure function of seed, step, rank)."""
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(self.seed, step, rank))
        return g

    def sample(
        self, batch_size: int, step: int, rank: int = 0, device: torch.device | str = "cpu"
    ) -> MaskBatch:
        """The masks of batch ``step`` on ``rank``: same arguments, same masks."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        device = torch.device(device)
        g = self.generator(step, rank, device)
        target, context = self._block_sizes(g)
        fixed = self.context_keep_for(target[0] * target[1])
        lay = self._layout(g, batch_size, device, fixed or self.cfg.min_keep, target, context)
        keep = fixed if fixed is not None else int(lay.counts.min())

        # uniform random subset of each image's context, cut to ``keep``
        b, n = batch_size, self.gh * self.gw
        keys = torch.rand(b, n, generator=g, device=device)
        keys = keys.masked_fill(~lay.context, 2.0)  # outside the context sorts last
        context_idx = keys.topk(keep, dim=1, largest=False).indices.sort(dim=1).values  # [B, Kc]
        return MaskBatch(context=context_idx, targets=lay.target_indices(self.gw))

    __call__ = sample

    @property
    def context_keeps(self) -> Mapping[int, int] | None:
        """The fixed context length ``Kc`` of each target length ``Kt`` (see
        :func:`fixed_context_lengths`); ``None`` when cut to each batch's minimum."""
        if self.cfg.context_length == "batch_min":
            return None
        if self._context_keeps is None:
            self._context_keeps = fixed_context_lengths(self.cfg, (self.gh, self.gw))
        return self._context_keeps

    def context_keep_for(self, kt: int) -> int | None:
        """``Kc`` of a batch whose target blocks have ``kt`` patches (``None``: batch minimum)."""
        keeps = self.context_keeps
        if keeps is None:
            return None
        if kt not in keeps:
            raise ValueError(f"no target block of {kt} patches is drawn (lengths: {tuple(keeps)})")
        return keeps[kt]

    def target_lengths(self) -> tuple[int, ...]:
        """Every target-block length ``Kt = h * w`` this config can draw, ascending.

        A compiled step sees one predictor graph per distinct ``Kt`` (the context length is a
        function of it), so this is how many graphs it may need. Exact
        (:func:`_reachable_sizes`), not sampled: a grid of (scale, aspect) values misses block
        sizes whose rounding cell the range only clips (a swept ``masking_ratio`` gave a few),
        and each missed one was a graph built mid-run that neither the recompile budget nor the
        warm-up had counted.
        """
        sizes = _reachable_sizes(self.cfg.target_scale, self.cfg.target_aspect, self.gh, self.gw)
        return tuple(sorted({h * w for h, w in sizes}))

    def target_length(self, step: int, rank: int = 0) -> int:
        """``Kt`` of batch ``step`` on ``rank`` without drawing any positions (microseconds).

        Lets a warm-up pick one step per target length, so every compiled graph is built
        before timing or training starts (the rarest length on 14x14 turns up in ~0.4% of
        steps)."""
        th, tw = self._block_sizes(self.generator(step, rank))[0]
        return th * tw

    def steps_covering_target_lengths(self, rank: int = 0, limit: int = 50_000) -> list[int]:
        """The first step (of the first ``limit``) that draws each possible ``Kt``, ascending."""
        wanted = len(self.target_lengths())
        first: dict[int, int] = {}
        for step in range(limit):
            first.setdefault(self.target_length(step, rank), step)
            if len(first) == wanted:
                break
        return sorted(first.values())

    def _target_shapes(self) -> dict[int, tuple[list[tuple[int, int]], torch.Tensor]]:
        """Per ``Kt``, the target shapes ``(h, w)`` of that length and how often each is drawn.

        The frequencies come from 20000 (scale, aspect) draws through :func:`block_size`; a
        length only a sliver of the ranges reaches (none of its shapes drawn) weighs its shapes
        equally."""
        c = self.cfg
        shapes: dict[int, list[tuple[int, int]]] = {}
        for h, w in sorted(_reachable_sizes(c.target_scale, c.target_aspect, self.gh, self.gw)):
            shapes.setdefault(h * w, []).append((h, w))
        g = torch.Generator().manual_seed(0)
        (s0, s1), (a0, a1) = c.target_scale, c.target_aspect
        drawn = Counter(
            block_size(s0 + (s1 - s0) * u, a0 + (a1 - a0) * v, self.gh, self.gw)
            for u, v in torch.rand(20_000, 2, generator=g, dtype=torch.float64).tolist()
        )
        out = {}
        for kt, hw in shapes.items():
            weights = torch.tensor([float(drawn[s]) for s in hw])
            out[kt] = (hw, weights if weights.sum() > 0 else torch.ones(len(hw)))
        return out

    def _context_size(self, g: torch.Generator) -> tuple[int, int]:
        c = self.cfg
        return block_size(
            _uniform(g, *c.context_scale), _uniform(g, *c.context_aspect), self.gh, self.gw
        )

    def _block_sizes(self, g: torch.Generator) -> tuple[tuple[int, int], tuple[int, int]]:
        """The batch's target and context block sizes: the first four draws of ``g``."""
        c, gh, gw = self.cfg, self.gh, self.gw
        # the four per-batch scalars come from the host: a device generator would need a sync
        gs = g if g.device.type == "cpu" else _host_twin(g)
        target = block_size(_uniform(gs, *c.target_scale), _uniform(gs, *c.target_aspect), gh, gw)
        return target, self._context_size(gs)

    def _layout(
        self,
        g: torch.Generator,
        b: int,
        device: torch.device,
        need: int,
        target: tuple[int, int],
        context: tuple[int, int],
    ) -> _Layout:
        """Draw positions of ``target`` and ``context`` blocks for ``b`` images, redrawing any
        image whose context keeps fewer than ``need`` patches."""
        c, gh, gw, t = self.cfg, self.gh, self.gw, self.cfg.num_targets
        (th, tw), (ch, cw), place = target, context, c.placement

        def draw(n: int) -> tuple[torch.Tensor, ...]:
            return (
                _starts(g, (n, t), th, gh, place, device),  # target tops [n, T]
                _starts(g, (n, t), tw, gw, place, device),  # target lefts [n, T]
                _starts(g, (n,), ch, gh, place, device),  # context top [n]
                _starts(g, (n,), cw, gw, place, device),  # context left [n]
            )

        def context_of(tt, tl, ct, cl) -> torch.Tensor:  # -> [n, gh*gw] bool
            ctx = _block_mask(ct, cl, ch, cw, gh, gw)  # [n, gh, gw]
            if not c.allow_overlap:
                ctx = ctx & ~_block_mask(tt, tl, th, tw, gh, gw).any(dim=1)
            return ctx.flatten(1)

        tt, tl, ct, cl = draw(b)
        ctx = context_of(tt, tl, ct, cl)
        counts = ctx.sum(1)
        for _ in range(self.max_tries):
            bad = (counts < need).nonzero().squeeze(1)  # the images to redraw
            if bad.numel() == 0:
                break
            # redraw only the failing images, all of them at once
            ntt, ntl, nct, ncl = draw(bad.numel())
            tt[bad], tl[bad], ct[bad], cl[bad] = ntt, ntl, nct, ncl
            ctx[bad] = context_of(ntt, ntl, nct, ncl)
            counts[bad] = ctx[bad].sum(1)
        if bool((counts < need).any()):
            what = (
                f"masks.min_keep={c.min_keep}"
                if need == c.min_keep
                else f"the fixed context length {need} (masks.context_length={c.context_length})"
            )
            scale = "masks.masking_ratio" if c.masking_ratio is not None else "masks.target_scale"
            raise MasksUnsatisfiable(
                f"could not keep {what} context patches on a {gh}x{gw} grid with {t} targets "
                f"of {th}x{tw} and context {ch}x{cw} after {self.max_tries} tries: lower "
                f"masks.min_keep, {scale} or masks.num_targets"
            )
        return _Layout(tt, tl, th, tw, ctx, counts)

    def state_dict(self) -> dict[str, int]:
        """All the sampler needs to resume (the step comes from the trainer)."""
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])


def check_masks(cfg: MasksConfig, grid: int | tuple[int, int], batch_size: int, seed: int) -> None:
    """Draw a run's first batch of masks on the driver; raises :class:`MasksUnsatisfiable`.

    A mask section that validates can still be impossible on the model's grid (many or large
    targets with a high ``min_keep``); found first inside the training workers, it cost every
    restart of ``train.max_failures`` and reached the user as a worker traceback. The fixed
    context lengths (a pure function of the section and grid) and step 0 are what rank 0 draws;
    under ``context_length="per_length"`` estimating those lengths draws every target size, so
    a size too large to keep ``min_keep`` fails here, not at the step that first draws it.
    """
    MaskSampler(cfg, grid, seed=seed).sample(batch_size, step=0)


# distinct mask sections drawn before a sweep (or by `radjepa config validate`): each costs
# 1-2.5 s at ViT-B/16's 14x14 grid and batch 256 (estimating its context length), so at most
# ~40 s in all
MAX_MASK_DRAWS = 16


def check_trial_masks(trials: Iterable[tuple[str, Config]], checked: set[str]) -> None:
    """:func:`check_masks` for each ``(setting in words, config)`` a run or sweep can train
    with, each distinct mask section once (``checked`` holds those drawn, across calls) and no
    more than :data:`MAX_MASK_DRAWS`; the refusal names the setting (none for a plain run)."""
    for said, trial in trials:
        drawn = f"{trial.masks.model_dump_json()}|{trial.model.grid}|{trial.train.batch_size}"
        if drawn in checked or len(checked) >= MAX_MASK_DRAWS:
            continue
        checked.add(drawn)
        try:
            check_masks(trial.masks, trial.model.grid, trial.train.batch_size, trial.train.seed)
        except MasksUnsatisfiable as err:
            if not said:
                raise
            raise MasksUnsatisfiable(f"tune.search_space: {said}: {err}") from None
