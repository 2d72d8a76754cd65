"""Activation and latent outliers, the mechanism the SOAP study credits for its robustness to quantization.

Statistics of one tensor a (pooled over the images analysed):
- sigma: standard deviation about the mean mu (population, ddof 0).
- max_over_sigma: max |a| / sigma. A symmetric per-tensor int8 quantizer spends its 255 levels on
  [-max |a|, max |a|], so its step, relative to a typical value, grows with this ratio.
- kurtosis: Pearson's, E[(a - mu)^4] / sigma^4: normal 3, Laplace 6, uniform 1.8 (not the excess kurtosis).
- frac_6sigma: fraction of elements with |a - mu| > 6 sigma (normal 2.0e-9, Laplace exp(-6 sqrt 2) = 2.1e-4).
- channel_max_spread: max over channels of max |a_c| divided by their median: 1 when every channel spans the same
  range; large when a few channels carry the outliers that one per-tensor scale must cover.
max |a| and the per-channel maxima are exact; mu, sigma, kurtosis and frac_6sigma come from a uniform random
subsample of at most `sample` elements per tensor and image (seeded), which bounds memory.

`collect` measures them for the input of every convolution of g_a, h_a, h_s and g_s (as the INT8 graphs see
them: deployable modules, GDN normalisations excluded; TCM: g_a, h_a, g_s, convolutions only, not yet the Swin
layers' linear layers) and for the latents y (g_a output) and z (h_a output),
together with each convolution's INT8 SQNR (`lic_deploy.export.sensitivity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SAMPLE = 1 << 16  # elements sampled per tensor and image
STAGES = ("g_a", "h_a", "h_s", "g_s")


@dataclass
class TensorStats:
    elements: int  # elements the moments were computed from
    channels: int
    mean: float
    sigma: float
    max_abs: float
    max_over_sigma: float
    kurtosis: float
    frac_6sigma: float
    channel_max_spread: float


def summarize(values: np.ndarray, channel_max: np.ndarray, max_abs: float | None = None) -> TensorStats:
    """Statistics from `values` (any shape, used whole) and the per-channel max |a|. `max_abs` defaults to the
    largest channel maximum."""
    v = values.astype(np.float64).ravel()
    mu = float(v.mean())
    c = v - mu
    var = float(np.mean(c**2))
    sigma = float(np.sqrt(var))
    top = float(channel_max.max()) if max_abs is None else float(max_abs)
    med = float(np.median(channel_max))
    nan = float("nan")
    return TensorStats(
        elements=int(v.size), channels=int(channel_max.size), mean=mu, sigma=sigma, max_abs=top,
        max_over_sigma=top / sigma if sigma > 0 else nan,
        kurtosis=float(np.mean(c**4)) / var**2 if var > 0 else nan,
        frac_6sigma=float(np.mean(np.abs(c) > 6 * sigma)) if sigma > 0 else 0.0,
        channel_max_spread=float(channel_max.max()) / med if med > 0 else nan,
    )


def tensor_stats(a: np.ndarray, channel_axis: int = 1) -> TensorStats:
    """Statistics of a whole array (no subsampling); channels along `channel_axis`."""
    axes = tuple(d for d in range(a.ndim) if d != channel_axis % a.ndim)
    return summarize(a, np.abs(a).max(axis=axes) if axes else np.abs(a))


class Accumulator:
    """Pools one tensor's statistics over several forward passes: exact channel maxima, sampled elements."""

    def __init__(self, sample: int = SAMPLE, seed: int = 0) -> None:
        self.sample = sample
        self.rng = np.random.default_rng(seed)
        self.parts: list[np.ndarray] = []
        self.channel_max: np.ndarray | None = None

    def add(self, t: Any) -> None:
        """Add a tensor [N, C, H, W] (torch or numpy)."""
        a = t.numpy() if hasattr(t, "numpy") else np.asarray(t)
        cmax = np.abs(a).max(axis=(0, 2, 3)).astype(np.float64)
        self.channel_max = cmax if self.channel_max is None else np.maximum(self.channel_max, cmax)
        flat = a.reshape(-1)
        if flat.size > self.sample:
            flat = flat[self.rng.integers(0, flat.size, self.sample)]
        self.parts.append(flat.astype(np.float32))

    def stats(self) -> TensorStats:
        if self.channel_max is None:
            raise ValueError("no tensor was added")
        return summarize(np.concatenate(self.parts), self.channel_max)


def collect(spec: Any, images: Sequence[np.ndarray], calib: Sequence[np.ndarray] | None = None, *,
            sample: int = SAMPLE, seed: int = 0) -> list[dict[str, Any]]:
    """Per-layer statistics rows, in execution order (g_a layers, y, h_a layers, z, h_s layers, g_s layers).

    `images` are float32 [3, H, W] in [0, 1] (padded here to the codec's multiple); `calib` are the crops whose
    max |x| sets each layer's INT8 input scale for the SQNR (min-max calibration; default: `images` themselves).
    Each row: name, stage, kind ("conv input" or "latent"), sqnr_db (None for latents) and the TensorStats.
    """
    from lic_deploy.export.onnx_export import deployable
    from lic_deploy.export.package_writer import stage_inputs
    from lic_deploy.export.sensitivity import ForwardHooks, SqnrMeter, conv_layers, input_max, run_stages
    from lic_deploy.runtime.images import pad_to_multiple

    stages = {s: deployable(spec.stages[s].module) for s in STAGES if s in spec.stages}  # TCM: no single h_s
    layers = conv_layers(stages)

    def input_sets(imgs: Sequence[np.ndarray]):
        for img in imgs:
            yield stage_inputs(spec, pad_to_multiple(img, spec.pad_multiple, spec.min_size)[0][None])

    amax = input_max(stages, input_sets(calib if calib is not None else images))
    meter = SqnrMeter(amax)
    acc = {name: Accumulator(sample, seed + i) for i, name in enumerate([*layers, "y", "z"])}

    def on_conv(name: str, m: Any, x: Any, y: Any) -> None:
        acc[name].add(x)
        meter.update(name, m, x, y)

    def on_latent(name: str, _m: Any, _x: Any, out: Any) -> None:
        acc[name].add(out)

    with ForwardHooks(layers, on_conv), ForwardHooks({"y": stages["g_a"], "z": stages["h_a"]}, on_latent):
        run_stages(stages, input_sets(images))
    sqnr = meter.db()
    order = [n for n in layers if n.startswith("g_a.")] + ["y"] + [n for n in layers if n.startswith("h_a.")] + \
        ["z"] + [n for n in layers if n.startswith(("h_s.", "g_s."))]
    rows = []
    for name in order:
        latent = name in ("y", "z")
        rows.append({"name": name, "stage": {"y": "g_a", "z": "h_a"}.get(name, name.split(".")[0]),
                     "kind": "latent" if latent else "conv input", "sqnr_db": None if latent else sqnr[name],
                     **asdict(acc[name].stats())})
    return rows
