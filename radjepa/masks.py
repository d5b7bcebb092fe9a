"""Multi-block masks (I-JEPA semantics), sampled for a whole batch at once with torch ops.

Per batch (as in the method) one target block size and one context block size are drawn:
a block of scale ``s ~ U(scale)`` and aspect ``a ~ U(aspect)`` (a = height / width) on a
``gh x gw`` patch grid is ``h = round(sqrt(s*gh*gw*a))`` by ``w = round(sqrt(s*gh*gw/a))``
patches (clipped to the grid). Each image then gets its own positions for ``num_targets`` target
blocks and one context block; target patches are removed from the context unless
``allow_overlap``; an image whose context keeps fewer than ``min_keep`` patches is redrawn.

Differences from the reference collator, on purpose:
- Positions: the top-left corner is drawn uniformly from ``[-(h-1), gh-1]`` and clipped into
  ``[0, gh-h]``. Every row (and column) is reachable (the reference never reached the last
  one), and edge patches are covered about as often as central ones: over the method's block
  sizes on a 14x14 grid the most/least covered patch differ by <3x and a corner gets ~0.7x the
  centre's coverage, where a uniform top-left start gives 35x and 0.03x. (No placement of a
  non-wrapping block is exactly uniform; this one keeps positions spread, not concentrated.)
- Equal lengths: all target blocks of a batch have the same size, so ``h*w`` indices each, no
  trimming. Context sets differ in size and are cut to one length by a uniformly random subset
  of each image's context (the reference kept the first k in raster order, which starved the
  bottom/right of context). The length is fixed by the config (``context_length="fixed"``:
  images with a smaller context are redrawn, so a compiled step sees static shapes) or, as in
  the method, the batch minimum (``"batch_min"``).
- Determinism without global state: each batch's generator is derived from ``(seed, step,
  rank)``, so a resumed run (same seed, same step) draws the same masks and DDP ranks differ.

``MaskBatch.context`` is ``LongTensor[B, Kc]`` (sorted ascending) and ``MaskBatch.targets`` is
``LongTensor[B, T, Kt]`` (row-major within each block); indices are into the row-major grid.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import torch

from radjepa.config import MasksConfig

__all__ = [
    "MaskBatch",
    "MaskSampler",
    "MasksUnsatisfiable",
    "block_size",
    "check_masks",
    "derive_seed",
    "fixed_context_length",
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
    g: torch.Generator, shape: tuple[int, ...], size: int, extent: int, device: torch.device
) -> torch.Tensor:
    """Block starts in [0, extent-size], drawn from [-(size-1), extent-1] and clipped."""
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


_FIXED_LENGTHS: dict[tuple[str, int, int], int] = {}


def fixed_context_length(cfg: MasksConfig, grid: tuple[int, int]) -> int:
    """The context length ``Kc`` kept by every batch under ``context_length="fixed"``.

    A pure function of the mask section and the grid (so every rank, every resumed run and
    every sweep trial with the same config agrees): the ``context_quantile`` quantile of the
    per-image context size, estimated over 16384 images (128 batches, each with its own block
    sizes) drawn with a fixed seed, and never below ``min_keep``. Cached per config.
    """
    gh, gw = grid
    key = (cfg.model_dump_json(), gh, gw)
    if key not in _FIXED_LENGTHS:
        probe = MaskSampler(cfg.model_copy(update={"context_length": "batch_min"}), grid)
        g = torch.Generator()
        g.manual_seed(derive_seed(0, 0, 0))
        counts = torch.cat(
            [probe._layout(g, 128, torch.device("cpu"), cfg.min_keep).counts for _ in range(128)]
        )
        q = torch.quantile(counts.float(), cfg.context_quantile, interpolation="lower")
        _FIXED_LENGTHS[key] = max(cfg.min_keep, int(q))
        log.debug("fixed context length %d for %s on %dx%d", _FIXED_LENGTHS[key], cfg, gh, gw)
    return _FIXED_LENGTHS[key]


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
        self._context_keep: int | None = None
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
        fixed = self.context_keep
        lay = self._layout(g, batch_size, device, need=fixed or self.cfg.min_keep)
        keep = fixed if fixed is not None else int(lay.counts.min())

        # uniform random subset of each image's context, cut to ``keep``
        b, n = batch_size, self.gh * self.gw
        keys = torch.rand(b, n, generator=g, device=device)
        keys = keys.masked_fill(~lay.context, 2.0)  # outside the context sorts last
        context = keys.topk(keep, dim=1, largest=False).indices.sort(dim=1).values  # [B, Kc]
        return MaskBatch(context=context, targets=lay.target_indices(self.gw))

    __call__ = sample

    @property
    def context_keep(self) -> int | None:
        """The fixed context length ``Kc`` (``None`` when cut to each batch's minimum)."""
        if self.cfg.context_length == "batch_min":
            return None
        if self._context_keep is None:
            self._context_keep = fixed_context_length(self.cfg, (self.gh, self.gw))
        return self._context_keep

    def target_lengths(self) -> tuple[int, ...]:
        """Every target-block length ``Kt = h * w`` this config can draw, ascending.

        A compiled step sees one graph per distinct ``Kt`` (the context length is fixed), so
        this is how many graphs it may need. Exact (:func:`_reachable_sizes`), not sampled: a
        grid of (scale, aspect) values misses block sizes whose rounding cell the range only
        clips (a swept ``masking_ratio`` gave a few), and each missed one was a graph built
        mid-run that neither the recompile budget nor the warm-up had counted.
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

    def _block_sizes(self, g: torch.Generator) -> tuple[tuple[int, int], tuple[int, int]]:
        """The batch's target and context block sizes: the first four draws of ``g``."""
        c, gh, gw = self.cfg, self.gh, self.gw
        # the four per-batch scalars come from the host: a device generator would need a sync
        gs = g if g.device.type == "cpu" else _host_twin(g)
        target = block_size(_uniform(gs, *c.target_scale), _uniform(gs, *c.target_aspect), gh, gw)
        context = block_size(
            _uniform(gs, *c.context_scale), _uniform(gs, *c.context_aspect), gh, gw
        )
        return target, context

    def _layout(self, g: torch.Generator, b: int, device: torch.device, need: int) -> _Layout:
        """Draw block sizes and positions for ``b`` images, redrawing any image whose context
        keeps fewer than ``need`` patches."""
        c, gh, gw, t = self.cfg, self.gh, self.gw, self.cfg.num_targets
        (th, tw), (ch, cw) = self._block_sizes(g)

        def draw(n: int) -> tuple[torch.Tensor, ...]:
            return (
                _starts(g, (n, t), th, gh, device),  # target tops [n, T]
                _starts(g, (n, t), tw, gw, device),  # target lefts [n, T]
                _starts(g, (n,), ch, gh, device),  # context top [n]
                _starts(g, (n,), cw, gw, device),  # context left [n]
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
                else f"the fixed context length {need} (masks.context_length=fixed)"
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
    context length (a pure function of the section and grid) and step 0 are what rank 0 draws.
    """
    MaskSampler(cfg, grid, seed=seed).sample(batch_size, step=0)
