"""`lic-deploy train`: rate-distortion training with SOAP or Adam, on the CPU or CUDA GPUs, resumable bit-exactly.

Loss = lmbda * 255^2 * MSE + bpp (CompressAI's convention; bpp from the likelihoods, an entropy estimate).
Learning rate: linear warm-up, then constant (the default, so that a run can be extended, as the equal-quality
comparison needs, without changing the steps already taken), multi-step decay or cosine (`schedule.py`).

The global batch of a step is split into shards: world size (torchrun processes) x `accum` (micro-batches per
process, gradients accumulated). Every crop is seeded by (seed, step, item) and every shard's quantization
noise by (seed, step, shard), so a resumed run repeats an uninterrupted one, and K processes compute what one
process with --accum K computes (up to the order of float additions in the gradient average).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.errors import CheckpointError, DataError, LicError

STREAM_ABOVE = 2000  # --data-mode auto streams folders with more images than this (or with subfolders)
DATA_MODES = ("auto", "memory", "stream")
MAX_CHANNELS = 1024  # --N, --M and every width at most this (wider models would not fit a training machine anyway)
MAX_BLOCKS = 32  # TCM's slices and depth at most this (its published models: 5 and 2)
MAX_BATCH, MAX_WORKERS = 1024, 64  # bounds that keep a typo from exhausting memory


@dataclass
class TrainConfig:
    """A training run. `steps` is the total step count to reach (a resumed run continues up to it)."""

    data: str
    output: str
    arch: str = "mbt2018-mean"
    N: int = 64
    M: int = 96
    optimizer: str = "soap"
    lmbda: float = 0.013
    val: str | None = None
    val_count: int = 6
    steps: int = 2000
    batch: int = 8  # the global batch: over all processes and micro-batches
    patch: int = 128
    downscale: int | None = 256
    lr: float | None = None
    warmup: int = 100
    schedule: str = "constant"  # constant | multistep | cosine
    lr_milestones: tuple[float, ...] = ()
    lr_gamma: float = 0.1
    clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    val_every: int = 250
    ckpt_every: int = 250
    align_every: int = 50
    resume: str | None = None
    init: str | None = None  # start from this checkpoint's weights (same arch and config), fresh optimizer, step 0
    threads: int | None = None
    limit: int | None = None  # use only the first `limit` training images (tests)
    until_val_loss: float | None = None  # stop at the first validation whose loss is at or below this
    max_seconds: float | None = None  # stop (and save) once this many seconds of training have run
    context_widths: tuple[int, int] | None = None  # ELIC: channel-context hidden widths (None: CompressAI's)
    arch_options: dict[str, int] | None = None  # further architecture knobs, e.g. TCM's slices, depth, attn
    device: str = "cpu"  # cpu, cuda, cuda:N (under torchrun with cuda: cuda:LOCAL_RANK)
    amp: str | None = None  # "bf16": the transforms in bfloat16, likelihoods and loss in float32
    accum: int = 1  # micro-batches per process and step
    data_mode: str = "auto"  # memory (every image held) | stream (decoded per item) | auto
    workers: int = 0  # DataLoader worker processes (stream mode)
    small: str = "skip"  # images smaller than the crop (stream mode): skip | upscale
    soap_impl: str = "lic-deploy"  # or "pytorch-optimizer" (the same updates); a resume keeps the run's own
    soap_bf16: bool = False  # lic-deploy's SOAP with bfloat16 products for conv weights; a resume keeps the run's own
    cuda_graph: bool = True  # lic-deploy's SOAP on CUDA replays its plain steps as a CUDA graph (False: eager)

    def arch_config(self) -> dict[str, int]:
        """The architecture config the model is built from and saved with."""
        config = {"N": self.N, "M": self.M}
        if self.context_widths:
            config |= {"cc1": self.context_widths[0], "cc2": self.context_widths[1]}
        return config | dict(self.arch_options or {})

    def lr_schedule(self) -> Any:
        from lic_deploy.train.schedule import Schedule

        return Schedule(self.schedule, self.warmup, tuple(self.lr_milestones), self.lr_gamma)


def rd_loss(out: dict[str, Any], x: Any, lmbda: float) -> tuple[Any, Any, Any]:
    """(loss, bpp, mse) of a CompressAI forward output on x [B, 3, H, W] in [0, 1]."""
    import torch

    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    bpp = sum(torch.log2(lk).sum() for lk in out["likelihoods"].values()) / -pixels
    mse = torch.mean((out["x_hat"] - x) ** 2)
    return lmbda * 255**2 * mse + bpp, bpp, mse


def _val_images(folder: str, count: int, adapter: Any) -> list[np.ndarray]:
    from lic_deploy.runtime.images import list_images, load_rgb, pad_to_multiple

    out = []
    for path in list_images(folder)[:count]:
        img, _ = load_rgb(path, warn=False)
        out.append(pad_to_multiple(img, adapter.pad_multiple, adapter.min_size)[0][None])
    return out


def validate(model: Any, images: list[np.ndarray], lmbda: float, device: str = "cpu") -> dict[str, float]:
    """Mean loss, bpp (entropy estimate with rounding) and PSNR (dB, on [0, 1] clipped output) over images."""
    import torch

    model.eval()
    rows = []
    with torch.no_grad():
        for img in images:
            x = torch.from_numpy(img).to(device)
            out = model(x)
            loss, bpp, _ = rd_loss(out, x, lmbda)
            mse = float(torch.mean((out["x_hat"].clamp(0, 1) - x) ** 2))
            rows.append((float(loss), float(bpp), 10 * math.log10(1 / max(mse, 1e-12))))
    model.train()
    return {k: float(np.mean([r[i] for r in rows])) for i, k in enumerate(("val_loss", "val_bpp", "val_psnr"))}


def log_path(checkpoint: Path) -> Path:
    """The training log (JSONL) written beside a checkpoint: X.pt -> X.pt.jsonl."""
    return checkpoint.with_suffix(checkpoint.suffix + ".jsonl")


def _check(cfg: TrainConfig) -> None:
    from lic_deploy.archs.registry import get_adapter
    from lic_deploy.train.optim import OPTIMIZERS

    adapter = get_adapter(cfg.arch)
    if cfg.optimizer not in OPTIMIZERS:
        raise LicError(f"unknown optimizer {cfg.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    for name in ("steps", "batch", "patch", "N", "M", "log_every", "val_every", "ckpt_every", "align_every"):
        if getattr(cfg, name) < 1:
            raise LicError(f"--{name.lower()} must be at least 1")
    if cfg.patch % adapter.pad_multiple or cfg.patch < adapter.min_size:
        raise LicError(f"--patch must be a multiple of {adapter.pad_multiple} and at least {adapter.min_size} for "
                       f"{cfg.arch}, got {cfg.patch}")
    if cfg.N > MAX_CHANNELS or cfg.M > MAX_CHANNELS:
        raise LicError(f"--N and --M must be at most {MAX_CHANNELS}, got {cfg.N} and {cfg.M}")
    for name, value in (("lmbda", cfg.lmbda), ("lr", cfg.lr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise LicError(f"--{name} must be a positive number, got {value}")
    if not (math.isfinite(cfg.clip) and cfg.clip >= 0):
        raise LicError(f"--clip must be a non-negative number (0 = off), got {cfg.clip}")
    if cfg.seed < 0 or (cfg.downscale is not None and cfg.downscale < 1):
        raise LicError(f"--seed must be at least 0 and --downscale at least 1 (or 0: off), got {cfg.seed} and "
                       f"{cfg.downscale}")
    if cfg.arch_options and cfg.arch != "tcm":
        raise LicError("--arch-config applies to --arch tcm only (ELIC's context widths: --context-widths)")
    options = cfg.arch_options or {}
    if any(w > MAX_CHANNELS for w in (*(cfg.context_widths or ()), *options.values())) or any(
            options.get(k, 0) > MAX_BLOCKS for k in ("slices", "depth")):
        raise LicError(f"--context-widths and --arch-config widths must be at most {MAX_CHANNELS}, slices and depth "
                       f"at most {MAX_BLOCKS}")
    out = Path(cfg.output)
    if out.is_dir() or not out.parent.is_dir():
        raise LicError(f"-o {out}: expected a checkpoint file in an existing folder")
    log = log_path(out)
    if not cfg.resume and out.exists():
        raise LicError(f"-o {out} exists: continue it with --resume {out}, or choose another -o")
    if not cfg.resume and log.exists():
        raise LicError(f"{log} exists, the log of an earlier run without a checkpoint: remove it or choose another -o")
    if not Path(cfg.data).is_dir():
        raise DataError(f"training data folder {cfg.data} does not exist")
    if cfg.val and not Path(cfg.val).is_dir():
        raise DataError(f"validation folder {cfg.val} does not exist")
    if cfg.context_widths and cfg.arch != "elic":
        raise LicError("--context-widths applies to --arch elic only")
    if cfg.until_val_loss is not None and not cfg.val:
        raise LicError("--until-val-loss needs --val (a validation folder)")
    if cfg.amp not in (None, "bf16"):
        raise LicError(f"--amp {cfg.amp!r}: only bf16 is supported")
    if cfg.accum < 1 or not 0 <= cfg.workers <= MAX_WORKERS or cfg.batch > MAX_BATCH:
        raise LicError(f"--accum must be at least 1, --workers in 0..{MAX_WORKERS} and --batch at most {MAX_BATCH}")
    if cfg.data_mode not in DATA_MODES:
        raise LicError(f"--data-mode {cfg.data_mode!r}: choose from {', '.join(DATA_MODES)}")
    cfg.lr_schedule()  # LicError for an impossible schedule
    if cfg.init and cfg.resume:
        raise LicError("--init starts a new run from a checkpoint's weights, --resume continues one: give one of them")


def open_dataset(cfg: TrainConfig) -> Any:
    """The in-memory or the streaming dataset, by --data-mode (auto: streaming for folders with subfolders or more
    than `STREAM_ABOVE` images)."""
    from lic_deploy.runtime.images import list_images
    from lic_deploy.train.data import StreamDataset, cached_dataset

    mode = cfg.data_mode
    if mode == "auto":
        files = list_images(cfg.data, recursive=True)
        nested = any(f.parent != Path(cfg.data) for f in files)
        mode = "stream" if nested or len(files) > STREAM_ABOVE or cfg.workers else "memory"
    if mode == "memory":
        return cached_dataset(str(cfg.data), cfg.patch, cfg.downscale, cfg.limit)
    return StreamDataset(cfg.data, cfg.patch, cfg.downscale, seed=cfg.seed, small=cfg.small, limit=cfg.limit)


def step_batches(dataset: Any, cfg: TrainConfig, start: int, items: list[int]) -> Iterator[np.ndarray]:
    """This process's items of every step from `start`: worker processes decode them in stream mode."""
    from lic_deploy.train.data import StreamDataset, loader

    if isinstance(dataset, StreamDataset) and cfg.workers:
        yield from loader(dataset, start, cfg.steps, items, cfg.workers)
        return
    for step in range(start, cfg.steps):
        yield dataset.batch(step, items, cfg.patch, cfg.seed)


def autocast_transforms(model: Any, device: str,
                        names: tuple[str, ...] = ("g_a", "g_s", "h_a", "h_s", "h_mean_s", "h_scale_s")) -> None:
    """Run the transforms `names` in bfloat16 (autocast) and return float32 from them, so that the entropy
    models' likelihoods and the loss stay float32. The modules' parameters stay float32 (the optimizers' copy);
    the state dict's keys do not change."""
    import torch

    for name in names:
        module = getattr(model, name, None)
        if module is None:
            continue
        inner = module.forward

        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                out = _inner(*args, **kwargs)
            return out.float()

        module.forward = forward


def flush_denormals() -> None:
    """Flush denormal floats to zero on the CPU: tiny gradients' statistics (SOAP's second moments of the entropy
    bottleneck's parameters) otherwise make small models' steps 10x slower. numpy's float limits are cached first,
    as computing them under flush-to-zero warns."""
    import torch

    np.finfo(np.float32), np.finfo(np.float64)
    torch.set_flush_denormal(True)


def cpu_has_bf16() -> bool | None:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX; None where /proc/cpuinfo is absent)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def noise_seed(seed: int, step: int, shard: int) -> int:
    """The torch seed of one shard's forward pass (quantization noise) at one step."""
    return (seed * 1_000_003 + step) * 4099 + shard


def train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """Run (or resume) training; writes cfg.output (checkpoint) and cfg.output + '.jsonl' (log). Returns the path.
    Under torchrun with several processes, every process calls this; process 0 writes the files."""
    from lic_deploy.train import distributed

    _check(cfg)
    world = distributed.setup(cfg.device)
    try:
        return _train(cfg, world, progress)
    finally:
        distributed.teardown(world)


def _train(cfg: TrainConfig, world: Any, progress: bool) -> Path:
    import torch

    from lic_deploy.archs.checkpoint import read_checkpoint, save_checkpoint
    from lic_deploy.archs.registry import get_adapter
    from lic_deploy.train import distributed
    from lic_deploy.train.alignment import alignment, flatten
    from lic_deploy.train.optim import AUX_LR, build_optimizer, precondition, split_parameters

    shards = world.size * cfg.accum
    if cfg.batch % shards:
        raise LicError(f"--batch {cfg.batch} must divide into {world.size} process(es) x --accum {cfg.accum}")
    micro = cfg.batch // shards
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    flush_denormals()
    out = Path(cfg.output)
    dataset = open_dataset(cfg)
    val = _val_images(cfg.val, cfg.val_count, get_adapter(cfg.arch)) if cfg.val and world.main else []
    schedule = cfg.lr_schedule()
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    try:
        model = get_adapter(cfg.arch).build(cfg.arch_config())
    except (ValueError, TypeError) as exc:  # an impossible width, or a knob the architecture does not have
        raise LicError(f"--arch {cfg.arch} {cfg.arch_config()}: {exc}") from None
    model.to(world.device)
    if cfg.amp:
        autocast_transforms(model, world.device)
    params, aux_params = split_parameters(model)
    resumed = read_checkpoint(Path(cfg.resume)) if cfg.resume else None  # (state, metadata)
    impl, bf16 = cfg.soap_impl, cfg.soap_bf16
    if resumed:  # the implementation the run started with (before it was recorded: pytorch-optimizer's)
        saved = resumed[1].get("hyperparameters") or {}
        impl, bf16 = saved.get("implementation", "pytorch-optimizer"), saved.get("bf16_matmul", False)
    try:
        opt, hparams = build_optimizer(cfg.optimizer, params, cfg.lr, impl, bf16)
    except ValueError as exc:
        raise LicError(str(exc)) from None
    if not cfg.cuda_graph and hasattr(opt, "cuda_graph"):
        opt.cuda_graph = False
    if bf16 and world.device == "cpu" and cpu_has_bf16() is False:
        warnings.warn("this CPU has no AVX512-BF16 or AMX: SOAP's bfloat16 products are emulated and slower than "
                      "float32 ones", stacklevel=2)
    aux_opt = torch.optim.Adam(aux_params, lr=AUX_LR)
    start, seconds = 0, 0.0
    init = resumed[1].get("init") if resumed else None  # where the run started from, kept through resumes
    if resumed:
        start, seconds = _resume(cfg, model, opt, aux_opt, resumed, schedule.record(cfg.steps))
    elif cfg.init:
        init = _init_weights(cfg, model)
    model.train()
    forward = distributed.wrap(model, world, [n for n, _ in model.named_parameters() if n.endswith(".quantiles")])

    def lr_at(step: int) -> float:
        return hparams["lr"] * schedule.factor(step, cfg.steps)

    meta = {"optimizer": cfg.optimizer, "hyperparameters": hparams, "lmbda": cfg.lmbda, "seed": cfg.seed,
            "batch": cfg.batch, "patch": cfg.patch, "downscale": cfg.downscale, "data_hash": dataset.hash,
            "data_images": len(dataset), "schedule": schedule.record(cfg.steps), "world_size": world.size,
            "device": world.device, "amp": cfg.amp, "config": asdict(cfg)}
    if init:
        meta["init"] = init

    def save(step: int) -> None:
        if world.main:
            save_checkpoint(out, model, cfg.arch, cfg.arch_config(),
                            {**meta, "steps": step, "seconds": round(seconds, 2)},
                            optimizer=opt.state_dict(), aux_optimizer=aux_opt.state_dict())

    def to_device(a: np.ndarray) -> Any:
        return torch.from_numpy(a).to(world.device, non_blocking=True)

    prev_delta: torch.Tensor | None = None
    acc: list[tuple[float, float, float]] = []
    mine = list(range(world.rank * cfg.accum * micro, (world.rank + 1) * cfg.accum * micro))
    batches = step_batches(dataset, cfg, start, mine)
    with contextlib.ExitStack() as stack:  # the log and the progress bar close on every way out
        log = stack.enter_context(open(log_path(out), "a")) if world.main else None
        bar = None
        if progress and world.main:
            from tqdm import tqdm

            bar = stack.enter_context(tqdm(total=cfg.steps, initial=start, desc=f"{cfg.optimizer} λ={cfg.lmbda}",
                                           unit="step"))
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            xs = next(batches)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            row: dict[str, Any] = {}
            measure = (step + 1) % cfg.align_every == 0
            opt.zero_grad(set_to_none=True)
            aux_opt.zero_grad(set_to_none=True)
            sums = np.zeros(3)
            for a in range(cfg.accum):
                shard = world.rank * cfg.accum + a
                x = to_device(xs[a * micro:(a + 1) * micro])
                if measure and shard == 0:  # rate and distortion gradients apart, through the preconditioner
                    torch.manual_seed(noise_seed(cfg.seed, step, shard))
                    _, bpp0, mse0 = rd_loss(model(x), x, cfg.lmbda)
                    grads = [torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
                             for t in (bpp0, cfg.lmbda * 255**2 * mse0)]
                    g_rate, g_dist = ([torch.zeros_like(p) if g is None else g for p, g in zip(params, gs, strict=True)]
                                      for gs in grads)
                    u_rate, u_dist = precondition(opt, params, g_rate), precondition(opt, params, g_dist)
                    if u_rate is not None and u_dist is not None:
                        row["intra_alignment"] = alignment([flatten(u_rate), flatten(u_dist)])
                        row["raw_intra_alignment"] = alignment([flatten(g_rate), flatten(g_dist)])
                torch.manual_seed(noise_seed(cfg.seed, step, shard))
                sync = forward.no_sync() if world.size > 1 and a < cfg.accum - 1 else contextlib.nullcontext()
                with sync:
                    loss, bpp, mse = rd_loss(forward(x), x, cfg.lmbda)
                    (loss / cfg.accum).backward()
                sums += (loss.item(), bpp.item(), mse.item())
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            before = flatten([p.detach() for p in params]) if (step + 2) % cfg.align_every == 0 or measure else None
            opt.step()
            aux_loss = model.aux_loss()  # a function of the quantiles alone: the same on every process
            aux_loss.backward()
            aux_opt.step()
            if before is not None:
                delta = flatten([p.detach() for p in params]) - before
                if measure and prev_delta is not None:
                    row["inter_alignment"] = alignment([prev_delta, delta])
                prev_delta = delta if not measure else None
            seconds += time.perf_counter() - t0
            acc.append(tuple(distributed.mean_over_ranks(list(sums / cfg.accum), world)))
            done = step + 1
            if not np.isfinite(acc[-1]).all():  # the same on every process; the diverged weights are not saved
                kept = f"; {out} holds the last checkpoint" if out.is_file() else ""
                raise LicError(f"the training loss became {acc[-1][0]} at step {done}: lower --lr (or --lmbda){kept}")
            if bar is not None:
                bar.update(1)
            log_now = done % cfg.log_every == 0 or done == cfg.steps
            val_now = bool(val) and (done % cfg.val_every == 0 or done == cfg.steps)  # independent of log_every
            if world.main and (log_now or val_now or row):
                if log_now:
                    row.update({k: float(np.mean([a[i] for a in acc])) for i, k in
                                enumerate(("train_loss", "train_bpp", "train_mse"))})
                    acc = []
                if val_now:
                    row.update(validate(model, val, cfg.lmbda, world.device))
                    if bar is not None:
                        bar.set_postfix(val_loss=f"{row['val_loss']:.4f}", psnr=f"{row['val_psnr']:.2f}")
                log.write(json.dumps({"step": done, "seconds": round(seconds, 3), "lr": lr_at(step), **row}) + "\n")
                log.flush()
            reached = cfg.until_val_loss is not None and row.get("val_loss", math.inf) <= cfg.until_val_loss
            if cfg.until_val_loss is not None and cfg.val and done % cfg.val_every == 0:
                reached = distributed.agree(reached, world)
            if cfg.max_seconds is not None:
                reached = distributed.agree(reached or seconds >= cfg.max_seconds, world)
            if done % cfg.ckpt_every == 0 or done == cfg.steps or reached:
                save(done)
            if reached:
                break
    if start >= cfg.steps:
        save(start)
    distributed.barrier(world)
    return out


def _resume(cfg: TrainConfig, model: Any, opt: Any, aux_opt: Any, checkpoint: tuple[dict[str, Any], dict[str, Any]],
            schedule: dict[str, Any]) -> tuple[int, float]:
    """Load weights (`checkpoint`: read_checkpoint's state and metadata of cfg.resume) and the optimizer states of
    cfg.resume onto the model's device; returns (step, seconds)."""
    import torch

    path = Path(cfg.resume)  # type: ignore[arg-type]
    state, meta = checkpoint
    if "optimizer" not in meta:
        raise CheckpointError(f"{path}: is not a checkpoint of `lic-deploy train` (no training state to resume); "
                              "--init starts a new run from its weights")
    if meta.get("optimizer") != cfg.optimizer or meta.get("arch") != cfg.arch:
        raise CheckpointError(f"{path}: was trained with {meta.get('optimizer')} on {meta.get('arch')}, "
                              f"cannot resume it as {cfg.optimizer} on {cfg.arch}")
    saved = meta.get("schedule", {"kind": "constant"})  # checkpoints before schedules: warm-up, then constant
    if saved.get("kind") != schedule["kind"] or (saved.get("kind") != "constant" and saved != schedule):
        raise CheckpointError(f"{path}: was trained with the schedule {saved}; resume it with the same schedule "
                              f"(--schedule, --warmup, --lr-milestones, --lr-gamma, --steps), not {schedule}")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if "optimizer" not in raw or "aux_optimizer" not in raw:
        raise CheckpointError(f"{path}: has no optimizer state to resume from")
    _load_weights(cfg, model, state, path)
    opt.load_state_dict(raw["optimizer"])
    aux_opt.load_state_dict(raw["aux_optimizer"])
    return int(meta.get("steps", 0)), float(meta.get("seconds", 0.0))


def _load_weights(cfg: TrainConfig, model: Any, state: dict[str, Any], path: Path) -> None:
    """`state` (read from `path`) into `model`; CheckpointError when its shapes do not fit the run's architecture."""
    import torch

    try:
        torch.nn.Module.load_state_dict(model, state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: its weights do not fit {cfg.arch} {cfg.arch_config()} "
                              f"({str(exc).splitlines()[0][:160]})") from None


def _init_weights(cfg: TrainConfig, model: Any) -> dict[str, Any]:
    """Load cfg.init's weights into `model` (built from cfg); CheckpointError if its architecture or shapes differ.
    Returns what the run started from: the checkpoint's path, steps, optimizer and lambda."""
    from lic_deploy.archs.checkpoint import read_checkpoint

    state, meta = read_checkpoint(Path(cfg.init))  # type: ignore[arg-type]
    if meta.get("arch") not in (None, cfg.arch):
        raise CheckpointError(f"{cfg.init}: is a {meta['arch']} checkpoint; --init needs one of the run's {cfg.arch}")
    _load_weights(cfg, model, state, Path(cfg.init))  # type: ignore[arg-type]
    return {"path": str(cfg.init), **{k: meta[k] for k in ("steps", "optimizer", "lmbda") if k in meta}}


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
