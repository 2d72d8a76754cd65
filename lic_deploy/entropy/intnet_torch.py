"""The integer networks on a PyTorch device (a GPU, for `--backend torch --device cuda`), bit for bit as numpy.

Same arithmetic as `intnet.IntLayer`, same proof: every accumulator is a sum of products of integers whose
absolute sum is below 2**53 (checked when the layer was built), so float64 computes it exactly in any order. That
rules out only algorithms that are not sums of products (FFT or Winograd convolutions), so convolutions are written
as explicit float64 matrix products: `unfold` (im2col) then a GEMM for conv; a GEMM then `fold` (col2im, which
adds overlapping terms, again exact sums) for transposed conv. Requantization runs in int64 with an arithmetic
right shift, as numpy does. Inputs and outputs are int64 numpy arrays, so a stream coded with this evaluator is
the stream numpy's evaluator codes (tests compare them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lic_deploy.entropy.intnet import IntLayer, IntNet, IntNetEvaluator


class TorchIntNet(IntNetEvaluator):
    """An `IntNet` evaluated with torch on `device`; call it like the IntNet (same checks, same result)."""

    def __init__(self, net: IntNet, device: str) -> None:
        import torch

        self.net, self.device = net, device
        self._compiled = []
        for layer in net.layers:
            w = torch.from_numpy(layer.weight.astype(np.float64)).to(device)
            ints = {k: torch.from_numpy(np.array(getattr(layer, k))).to(device)[:, None, None]
                    for k in ("bias", "mult", "mult_neg", "shift")}
            self._compiled.append((layer, w, ints))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        self.net.check_input(x)
        a = torch.from_numpy(x).to(self.device)
        with torch.no_grad():
            for layer, w, ints in self._compiled:
                a = _requantize(_accumulate(layer, w, a) + ints["bias"], layer, ints)
        return a.cpu().numpy()


def _accumulate(layer: IntLayer, w: Any, a: Any) -> Any:
    """Exact int64 accumulator [O, H', W'] of one conv or transposed conv on int64 [I, H, W] (bias excluded)."""
    import torch
    import torch.nn.functional as F

    (kh, kw), s, p = layer.kernel, layer.stride, layer.padding
    h, wd = a.shape[1:]
    ho, wo = layer.output_size(h, wd)
    x = a.to(torch.float64)[None]
    if layer.kind == "conv":
        cols = F.unfold(x, (kh, kw), padding=p, stride=s)[0]  # [I*kh*kw, L]
        acc = w.reshape(w.shape[0], -1) @ cols  # [O, L]
        return torch.round(acc).to(torch.int64).reshape(-1, ho, wo)
    n_in, n_out = w.shape[0], w.shape[1]
    cols = w.reshape(n_in, n_out * kh * kw).t() @ x[0].reshape(n_in, h * wd)  # [O*kh*kw, H*W]
    full = F.fold(cols[None], ((h - 1) * s + kh + layer.output_padding, (wd - 1) * s + kw + layer.output_padding),
                  (kh, kw), stride=s)[0]
    return torch.round(full[:, p:p + ho, p:p + wo]).to(torch.int64)


def _requantize(acc: Any, layer: IntLayer, ints: dict[str, Any]) -> Any:
    """clip(floor((acc * m + 2**(shift - 1)) / 2**shift)) with m by the accumulator's sign, in int64."""
    import torch

    t = torch.where(acc >= 0, ints["mult"], ints["mult_neg"]) * acc
    t = (t + (torch.ones_like(ints["shift"]) << (ints["shift"] - 1))) >> ints["shift"]
    return torch.clamp(t, layer.out_min, layer.out_max)

