"""`lic-deploy train`: rate-distortion training with SOAP or Adam, resumable bit-exactly.

Loss = lmbda * 255^2 * MSE + bpp (CompressAI's convention; bpp from the likelihoods, an entropy estimate).
Learning rate: linear warm-up, then constant (CompressAI's usual schedule without plateau decay), so that a
run can be extended, as the equal-quality comparison needs, without changing the steps already taken.
Every batch and every noise draw is seeded by (seed, step), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lic_deploy.errors import CheckpointError, DataError, LicError


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
    batch: int = 8
    patch: int = 128
    downscale: int | None = 256
    lr: float | None = None
    warmup: int = 100
    clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    val_every: int = 250
    ckpt_every: int = 250
    align_every: int = 50
    resume: str | None = None
    threads: int | None = None
    limit: int | None = None  # use only the first `limit` training images (tests)
    until_val_loss: float | None = None  # stop at the first validation whose loss is at or below this
    context_widths: tuple[int, int] | None = None  # ELIC: channel-context hidden widths (None: CompressAI's)

    def arch_config(self) -> dict[str, int]:
        """The architecture config the model is built from and saved with."""
        config = {"N": self.N, "M": self.M}
        if self.context_widths:
            config |= {"cc1": self.context_widths[0], "cc2": self.context_widths[1]}
        return config


def rd_loss(out: dict[str, Any], x: Any, lmbda: float) -> tuple[Any, Any, Any]:
    """(loss, bpp, mse) of a CompressAI forward output on x [B, 3, H, W] in [0, 1]."""
    import torch

    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    bpp = sum(torch.log2(lk).sum() for lk in out["likelihoods"].values()) / -pixels
    mse = torch.mean((out["x_hat"] - x) ** 2)
    return lmbda * 255**2 * mse + bpp, bpp, mse


def _val_images(folder: str, count: int) -> list[np.ndarray]:
    from lic_deploy.runtime.images import list_images, load_rgb, pad_to_multiple

    out = []
    for path in list_images(folder)[:count]:
        img, _ = load_rgb(path, warn=False)
        out.append(pad_to_multiple(img, 64)[0][None])
    return out


def validate(model: Any, images: list[np.ndarray], lmbda: float) -> dict[str, float]:
    """Mean loss, bpp (entropy estimate with rounding) and PSNR (dB, on [0, 1] clipped output) over images."""
    import torch

    model.eval()
    rows = []
    with torch.no_grad():
        for img in images:
            x = torch.from_numpy(img)
            out = model(x)
            loss, bpp, _ = rd_loss(out, x, lmbda)
            mse = float(torch.mean((out["x_hat"].clamp(0, 1) - x) ** 2))
            rows.append((float(loss), float(bpp), 10 * math.log10(1 / max(mse, 1e-12))))
    model.train()
    return {k: float(np.mean([r[i] for r in rows])) for i, k in enumerate(("val_loss", "val_bpp", "val_psnr"))}


def _check(cfg: TrainConfig) -> None:
    from lic_deploy.archs.registry import get_adapter
    from lic_deploy.train.optim import OPTIMIZERS

    get_adapter(cfg.arch)
    if cfg.optimizer not in OPTIMIZERS:
        raise LicError(f"unknown optimizer {cfg.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    for name in ("steps", "batch", "patch", "N", "M", "log_every", "val_every", "ckpt_every", "align_every"):
        if getattr(cfg, name) < 1:
            raise LicError(f"--{name.lower()} must be at least 1")
    if cfg.patch % 64:
        raise LicError(f"--patch must be a multiple of 64 (the model's stride), got {cfg.patch}")
    if cfg.lmbda <= 0:
        raise LicError("--lmbda must be positive")
    if not Path(cfg.data).is_dir():
        raise DataError(f"training data folder {cfg.data} does not exist")
    if cfg.val and not Path(cfg.val).is_dir():
        raise DataError(f"validation folder {cfg.val} does not exist")
    if cfg.context_widths and cfg.arch != "elic":
        raise LicError("--context-widths applies to --arch elic only")
    if cfg.until_val_loss is not None and not cfg.val:
        raise LicError("--until-val-loss needs --val (a validation folder)")


def train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """Run (or resume) training; writes cfg.output (checkpoint) and cfg.output + '.jsonl' (log). Returns the path."""
    import torch

    from lic_deploy.archs.checkpoint import read_checkpoint, save_checkpoint
    from lic_deploy.archs.registry import get_adapter
    from lic_deploy.train.alignment import alignment, flatten
    from lic_deploy.train.data import cached_dataset
    from lic_deploy.train.optim import AUX_LR, build_optimizer, precondition, split_parameters

    _check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    log_path = out.with_suffix(out.suffix + ".jsonl")
    dataset = cached_dataset(str(cfg.data), cfg.patch, cfg.downscale, cfg.limit)
    val = _val_images(cfg.val, cfg.val_count) if cfg.val else []
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    try:
        model = get_adapter(cfg.arch).build(cfg.arch_config())
    except ValueError as exc:  # an impossible width for the architecture
        raise LicError(str(exc)) from None
    params, aux_params = split_parameters(model)
    opt, hparams = build_optimizer(cfg.optimizer, params, cfg.lr)
    aux_opt = torch.optim.Adam(aux_params, lr=AUX_LR)
    start, seconds = 0, 0.0
    if cfg.resume:
        start, seconds = _resume(cfg, model, opt, aux_opt, read_checkpoint)
    model.train()

    def lr_at(step: int) -> float:
        return hparams["lr"] * min(1.0, (step + 1) / max(1, cfg.warmup))

    meta = {"optimizer": cfg.optimizer, "hyperparameters": hparams, "lmbda": cfg.lmbda, "seed": cfg.seed,
            "batch": cfg.batch, "patch": cfg.patch, "downscale": cfg.downscale, "data_hash": dataset.hash,
            "data_images": len(dataset), "config": asdict(cfg)}

    def save(step: int) -> None:
        save_checkpoint(out, model, cfg.arch, cfg.arch_config(),
                        {**meta, "steps": step, "seconds": round(seconds, 2)},
                        optimizer=opt.state_dict(), aux_optimizer=aux_opt.state_dict())

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.optimizer} λ={cfg.lmbda}", unit="step")
    prev_delta: torch.Tensor | None = None
    acc: list[tuple[float, float, float]] = []
    with open(log_path, "a") as log:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed * 1_000_003 + step)
            x = torch.from_numpy(dataset.batch(step, cfg.batch, cfg.patch, cfg.seed))
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            row: dict[str, Any] = {}
            measure = (step + 1) % cfg.align_every == 0
            out_fwd = model(x)
            loss, bpp, mse = rd_loss(out_fwd, x, cfg.lmbda)
            opt.zero_grad(set_to_none=True)
            aux_opt.zero_grad(set_to_none=True)
            if measure:  # rate and distortion gradients separately, through the current preconditioner
                g_rate = torch.autograd.grad(bpp, params, retain_graph=True, allow_unused=True)
                g_dist = torch.autograd.grad(cfg.lmbda * 255**2 * mse, params, retain_graph=True,
                                             allow_unused=True)
                g_rate = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_rate, strict=True)]
                g_dist = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_dist, strict=True)]
                u_rate, u_dist = precondition(opt, params, g_rate), precondition(opt, params, g_dist)
                if u_rate is not None and u_dist is not None:
                    row["intra_alignment"] = alignment([flatten(u_rate), flatten(u_dist)])
                    row["raw_intra_alignment"] = alignment([flatten(g_rate), flatten(g_dist)])
            loss.backward()
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            before = flatten([p.detach() for p in params]) if (step + 2) % cfg.align_every == 0 or measure else None
            opt.step()
            aux_loss = model.aux_loss()
            aux_loss.backward()
            aux_opt.step()
            if before is not None:
                delta = flatten([p.detach() for p in params]) - before
                if measure and prev_delta is not None:
                    row["inter_alignment"] = alignment([prev_delta, delta])
                prev_delta = delta if not measure else None
            seconds += time.perf_counter() - t0
            acc.append((loss.item(), bpp.item(), mse.item()))
            done = step + 1
            if bar is not None:
                bar.update(1)
            log_now = done % cfg.log_every == 0 or done == cfg.steps
            val_now = bool(val) and (done % cfg.val_every == 0 or done == cfg.steps)  # independent of log_every
            if log_now or val_now or row:
                if log_now:
                    row.update({k: float(np.mean([a[i] for a in acc])) for i, k in
                                enumerate(("train_loss", "train_bpp", "train_mse"))})
                    acc = []
                if val_now:
                    row.update(validate(model, val, cfg.lmbda))
                    if bar is not None:
                        bar.set_postfix(val_loss=f"{row['val_loss']:.4f}", psnr=f"{row['val_psnr']:.2f}")
                log.write(json.dumps({"step": done, "seconds": round(seconds, 3), "lr": lr_at(step), **row}) + "\n")
                log.flush()
            reached = cfg.until_val_loss is not None and row.get("val_loss", math.inf) <= cfg.until_val_loss
            if done % cfg.ckpt_every == 0 or done == cfg.steps or reached:
                save(done)
            if reached:
                break
    if bar is not None:
        bar.close()
    if start >= cfg.steps:
        save(start)
    return out


def _resume(cfg: TrainConfig, model: Any, opt: Any, aux_opt: Any, read_checkpoint: Any) -> tuple[int, float]:
    """Load weights and optimizer states from cfg.resume; returns (step, seconds) reached."""
    import torch

    path = Path(cfg.resume)  # type: ignore[arg-type]
    state, meta = read_checkpoint(path)
    if meta.get("optimizer") != cfg.optimizer or meta.get("arch") != cfg.arch:
        raise CheckpointError(f"{path}: was trained with {meta.get('optimizer')} on {meta.get('arch')}, "
                              f"cannot resume it as {cfg.optimizer} on {cfg.arch}")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if "optimizer" not in raw or "aux_optimizer" not in raw:
        raise CheckpointError(f"{path}: has no optimizer state to resume from")
    torch.nn.Module.load_state_dict(model, state)
    opt.load_state_dict(raw["optimizer"])
    aux_opt.load_state_dict(raw["aux_optimizer"])
    return int(meta.get("steps", 0)), float(meta.get("seconds", 0.0))


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
