"""The JEPA step: schedules, optimizer groups, exact EMA, and learning on real X-rays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.testing import CompileCounter

from radjepa.config import load_config
from radjepa.ema import ema_update, ema_update_loop
from radjepa.engine import Pretrainer
from radjepa.metrics import rankme
from radjepa.optim import build_optimizer, param_groups, set_hparams
from radjepa.schedules import lr_at, momentum_at, schedule_at, warmup_steps, wd_at
from radjepa.transforms import random_resized_crop, to_model_input

TINY = "configs/tiny_cpu.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def xray_pixels(nih_dir) -> torch.Tensor:
    """64 real NIH radiographs as stored uint8 pixels [64, 256, 256]."""
    paths = sorted((nih_dir / "images").glob("*.png"))[:64]
    arrs = [np.asarray(Image.open(p).convert("L"), dtype=np.uint8) for p in paths]
    return torch.from_numpy(np.stack(arrs))


def test_schedules_follow_the_method():
    cfg = load_config(TINY, ["train.steps=100", "optim.warmup_fraction=0.1"])
    o = cfg.optim
    assert warmup_steps(cfg) == 10
    assert lr_at(0, cfg) == pytest.approx(o.start_lr)
    assert lr_at(5, cfg) == pytest.approx((o.start_lr + o.lr) / 2)
    assert lr_at(10, cfg) == pytest.approx(o.lr)
    assert lr_at(55, cfg) == pytest.approx((o.lr + o.final_lr) / 2)
    assert lr_at(100, cfg) == pytest.approx(o.final_lr)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert wd_at(0, cfg) == pytest.approx(o.weight_decay)
    assert wd_at(50, cfg) == pytest.approx((o.weight_decay + o.final_weight_decay) / 2)
    assert wd_at(100, cfg) == pytest.approx(o.final_weight_decay)
    assert momentum_at(0, cfg) == pytest.approx(0.996)
    assert momentum_at(25, cfg) == pytest.approx(0.996 + 0.004 * 0.25)
    assert momentum_at(1000, cfg) == pytest.approx(1.0)  # past the end: held
    assert schedule_at(7, cfg).lr == lr_at(7, cfg)


def test_no_weight_decay_on_biases_and_1d_params():
    cfg = load_config(TINY)
    p = Pretrainer(cfg, "cpu")
    decay, no_decay = param_groups([p.model.encoder, p.model.predictor])
    assert all(t.ndim >= 2 for t in decay["params"])
    assert all(t.ndim <= 1 for t in no_decay["params"]) and no_decay["params"]
    opt = build_optimizer([p.model.encoder], cfg.optim, torch.device("cpu"))
    set_hparams(opt, lr=0.1, weight_decay=0.3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    assert all(g["lr"] == 0.1 for g in opt.param_groups)
    enc_ids = {id(t) for t in p.model.target_encoder.parameters()}
    opt_ids = {id(t) for g in p.optimizer.param_groups for t in g["params"]}
    assert not enc_ids & opt_ids  # the target encoder is never optimised


@pytest.mark.parametrize("update", [ema_update, ema_update_loop])
def test_ema_moves_target_by_exactly_the_momentum(update):
    g = torch.Generator().manual_seed(0)
    target = [torch.randn(5, 4, generator=g), torch.randn(7, generator=g)]
    online = [torch.randn(5, 4, generator=g), torch.randn(7, generator=g)]
    before = [t.clone() for t in target]
    update(target, online, 0.9)
    for t, b, o in zip(target, before, online, strict=True):
        assert torch.allclose(t, 0.9 * b + 0.1 * o, atol=1e-6)
        assert float((t - o).norm() / (b - o).norm()) == pytest.approx(0.9, rel=1e-5)


def test_train_step_updates_target_by_the_scheduled_momentum():
    cfg = load_config(TINY, ["ema.start=0.9", "ema.end=1.0", "train.steps=10"])
    p = Pretrainer(cfg, "cpu")
    x = torch.randn(4, 1, 96, 96)
    p.train_step(x)  # make online and target differ
    tgt_before = [t.clone() for t in p.model.target_encoder.parameters()]
    out = p.train_step(x)
    m = momentum_at(1, cfg)
    assert float(out["momentum"]) == pytest.approx(m) and p.step == 2
    for t, b, o in zip(
        p.model.target_encoder.parameters(), tgt_before, p.model.encoder.parameters(), strict=True
    ):
        assert torch.allclose(t, m * b + (1 - m) * o, atol=1e-6)
        assert not t.requires_grad


def test_train_step_outputs_and_input_is_checked():
    p = Pretrainer(load_config(TINY, ["optim.loss=mse"]), "cpu")
    out = p.train_step(torch.randn(2, 1, 96, 96))
    assert set(out) == {"loss", "lr", "wd", "momentum"}
    assert isinstance(out["loss"], torch.Tensor) and out["loss"].ndim == 0  # read when wanted
    assert all(isinstance(out[k], float) for k in ("lr", "wd", "momentum"))  # host values
    assert p.target_embeddings(torch.randn(3, 1, 96, 96)).shape == (3, 192)
    with pytest.raises(ValueError, match="crops"):
        p.train_step(torch.randn(2, 1, 64, 64))


def test_tiny_model_learns_on_real_xrays(xray_pixels):
    """~50 steps on real NIH radiographs: the loss falls, stays finite, features do not collapse."""
    cfg = load_config(TINY)
    p = Pretrainer(cfg, "cpu")
    images = to_model_input(xray_pixels)  # [64, 1, 256, 256]
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(50):
        batch = images[torch.randperm(64, generator=gen)[: cfg.train.batch_size]]
        crops = random_resized_crop(
            batch, cfg.data.crop_size, cfg.data.crop_scale, cfg.data.crop_ratio, generator=gen
        )
        losses.append(float(p.train_step(crops)["loss"]))
        assert math.isfinite(losses[-1]), f"loss became {losses[-1]} at step {step}"
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"loss {first:.4f} -> {last:.4f}")
    assert last < 0.7 * first, (first, last)
    emb = p.target_embeddings(torch.nn.functional.interpolate(images[:32], size=96))
    assert rankme(emb) > 2.0


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        p = Pretrainer(
            load_config(TINY, ["model.depth=1", "model.pred_depth=1"]), "cpu", rank, world
        )
        assert p._encoder is not p.model.encoder  # wrapped in DDP
        g = torch.Generator().manual_seed(rank)  # each rank sees different images
        for _ in range(2):
            p.train_step(torch.randn(4, 1, 96, 96, generator=g))
        masks = p.sampler.sample(4, 0, rank)
        torch.save(
            {
                "encoder": p.model.encoder.state_dict(),
                "target": p.model.target_encoder.state_dict(),
                "context_idx": masks.context,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_stay_in_sync(tmp_path):
    """Two real gloo ranks (separate processes): averaged gradients keep weights identical."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    fresh = Pretrainer(load_config(TINY, ["model.depth=1", "model.pred_depth=1"]), "cpu")
    moved = False
    for k, v in r0["encoder"].items():
        assert torch.equal(v, r1["encoder"][k]), k  # gradients were averaged across ranks
        assert torch.equal(r0["target"][k], r1["target"][k]), k
        moved |= not torch.equal(v, fresh.model.encoder.state_dict()[k])
    assert moved
    assert not torch.equal(r0["context_idx"], r1["context_idx"])  # masks differ per rank


@pytest.mark.parametrize("context_length", ["fixed", "batch_min"])
def test_compiled_step_graph_count(context_length):
    """Static shapes: after one predictor graph per target-block length and one encoder graph
    per context length (itself one per target length), the compiled step never recompiles
    under ``context_length=fixed``; the method's batch-minimum cut compiles a new encoder graph
    for each new context length (so the count below can fail)."""
    cfg = load_config(TINY, [f"masks.context_length={context_length}"])
    p = Pretrainer(cfg, "cpu")
    torch._dynamo.reset()
    counters = {name: CompileCounter() for name in ("enc", "tgt", "pred")}
    if context_length == "fixed":
        p.compile(backend=counters["enc"])  # the public path: one backend for all three
        counters = {"all": counters["enc"]}
    else:  # what the method's variable context length costs a static-shape compile
        torch._dynamo.config.recompile_limit = 64
        p._encoder = torch.compile(p._encoder, backend=counters["enc"], dynamic=False)
        p._target = torch.compile(p._target, backend=counters["tgt"], dynamic=False)
        p._predictor = torch.compile(p._predictor, backend=counters["pred"], dynamic=False)
    x = torch.randn(4, 1, 96, 96)
    kt, kc = set(), set()
    for _ in range(10):
        m = p.sampler.sample(4, p.step)
        kt.add(m.targets.shape[-1])
        kc.add(m.context.shape[-1])
        if context_length == "fixed":  # each batch keeps its own target length's context
            assert m.context.shape[-1] == p.sampler.context_keep_for(m.targets.shape[-1])
        assert torch.isfinite(p.train_step(x)["loss"])
    assert kt <= set(p.sampler.target_lengths())
    if context_length == "fixed":
        assert kc == {p.sampler.context_keep_for(k) for k in kt}
        assert len(kt) > 1  # the context length does change with the target length here
        # target encoder once, online encoder once per context length, predictor once per Kt
        assert counters["all"].frame_count == 1 + len(kc) + len(kt)
    else:
        assert len(kc) > 1
        assert counters["enc"].frame_count == len(kc)
        assert counters["tgt"].frame_count == 1
    torch._dynamo.reset()


def test_warm_up_at_one_step_per_target_length_builds_every_graph_up_front():
    """What bench/train_step.py --compile does before timing: after one step at each
    ``Kt``'s first step, no later step compiles anything."""
    p = Pretrainer(load_config(TINY, ["model.depth=1", "model.pred_depth=1"]), "cpu")
    torch._dynamo.reset()
    counter = CompileCounter()
    p.compile(backend=counter)
    firsts = p.sampler.steps_covering_target_lengths()
    lengths = {p.sampler.target_length(s) for s in firsts}
    assert lengths == set(p.sampler.target_lengths()) and len(firsts) == len(lengths) > 1
    x = torch.randn(2, 1, 96, 96)
    for step in firsts:
        p.step = step
        p.train_step(x)
    graphs = 1 + len({p.sampler.context_keep_for(k) for k in lengths}) + len(lengths)
    assert counter.frame_count == graphs
    p.step = 0
    for _ in range(40):
        p.train_step(x)
    assert counter.frame_count == graphs
    torch._dynamo.reset()


def test_block_compile_shares_one_graph_per_shape_across_blocks():
    """``train.compile_scope=blocks``: every block of the three modules is compiled in place,
    and the blocks share graphs, so the count is the same 1 + #Kc + #Kt as for whole modules
    (not times the depth), the checkpoint keys are the plain ones, and a drop-path rate per block
    (which dynamo specialises on) still fits under the raised recompile limit."""
    cfg = load_config(TINY, ["train.compile_scope=blocks"])
    p = Pretrainer(cfg, "cpu")
    assert len(p.model.encoder.blocks) > 1 and len(p.model.predictor.blocks) > 1
    torch._dynamo.reset()
    counter = CompileCounter()
    p.compile(backend=counter)
    assert p._encoder is p.model.encoder  # in place: nothing wrapped
    x = torch.randn(4, 1, 96, 96)
    kt = set()
    for _ in range(10):
        kt.add(p.sampler.target_length(p.step))
        assert torch.isfinite(p.train_step(x)["loss"])
    graphs = 1 + len({p.sampler.context_keep_for(k) for k in kt}) + len(kt)
    assert counter.frame_count == graphs
    fresh = Pretrainer(cfg, "cpu")
    fresh.load_state_dict(p.state_dict())  # strict: same keys as an uncompiled trainer
    torch._dynamo.reset()

    drop = Pretrainer(load_config(TINY, ["model.drop_path=0.1"]), "cpu")
    counter = CompileCounter()
    drop.compile(backend=counter, scope="blocks")
    for _ in range(4):
        drop.train_step(x)
    blocks = [b for m in (drop.model.encoder, drop.model.predictor) for b in m.blocks]
    assert counter.frame_count > graphs  # specialised per rate, still all compiled
    limit = torch._dynamo.config.recompile_limit
    every_kt = drop.sampler.target_lengths()
    every_kc = set(drop.sampler.context_keeps.values())
    assert limit >= (1 + len(every_kc) + len(every_kt)) * len(blocks)
    torch._dynamo.reset()


def test_block_compiled_step_computes_the_eager_step():
    """Compiling blocks changes how the step runs, not what it computes: through AOTAutograd
    (the graph capture and autograd split inductor gets, minus code generation) three steps
    give the eager trainer's losses and weights to fp32 rounding."""
    cfg = load_config(TINY, ["train.compile_scope=blocks"])
    x = torch.randn(4, 1, 96, 96, generator=torch.Generator().manual_seed(3))
    eager = Pretrainer(cfg, "cpu")
    torch._dynamo.reset()
    compiled = Pretrainer(cfg, "cpu")
    compiled.compile(backend="aot_eager")
    init = eager.model.encoder.blocks[0].attn.qkv.weight.detach().clone()
    for _ in range(3):
        a, b = eager.train_step(x)["loss"], compiled.train_step(x)["loss"]
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for (k, v), w in zip(
        eager.model.state_dict().items(), compiled.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(w, v, rtol=1e-4, atol=1e-6, msg=k)
    assert not torch.equal(eager.model.encoder.blocks[0].attn.qkv.weight, init)  # it trained
    torch._dynamo.reset()


def test_compile_scope_is_checked():
    with pytest.raises(ValueError, match="compile_scope"):
        load_config(TINY, ["train.compile_scope=layers"])
    with pytest.raises(ValueError, match="'modules' or 'blocks'"):
        Pretrainer(load_config(TINY, []), "cpu").compile(scope="layers")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_bf16_step_and_device_masks():
    cfg = load_config(TINY, ["train.precision=auto"])
    p = Pretrainer(cfg, "cuda")
    assert p.amp_dtype == torch.bfloat16 and p.scaler is None
    x = torch.randn(8, 1, 96, 96, device="cuda")
    losses = [p.train_step(x)["loss"] for _ in range(3)]
    assert all(torch.isfinite(v) for v in losses)
    a = p.sampler.sample(8, 0, device="cuda")
    b = p.sampler.sample(8, 0, device="cuda")
    assert a.context.is_cuda and torch.equal(a.context, b.context)
    assert p.target_embeddings(x).dtype == torch.float32
