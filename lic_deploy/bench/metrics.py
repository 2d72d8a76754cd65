"""Image quality and rate of one decoded image: PSNR and MS-SSIM on 8-bit RGB, bits per pixel from real bytes.

Both quality metrics compare uint8 images, i.e. after the decoder's rounding to 8 bit, as a user sees them.
Greyscale decodes ([H, W]) are compared as three equal channels.
"""

from __future__ import annotations

import numpy as np

from lic_deploy.runtime.images import psnr as _psnr

MS_SSIM_WINDOW = 11  # pytorch-msssim's default Gaussian window (sigma 1.5)
MS_SSIM_SCALES = 5  # the standard five scales (weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# The window must fit the coarsest scale: the smaller side must exceed (window - 1) * 2**(scales - 1) pixels.
MS_SSIM_MIN_SIDE = (MS_SSIM_WINDOW - 1) * 2 ** (MS_SSIM_SCALES - 1) + 1  # 161


def _rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img


def psnr(ref_u8: np.ndarray, test_u8: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255, MSE over all pixels and channels); inf when identical."""
    return _psnr(_rgb(ref_u8), _rgb(test_u8))


def ms_ssim(ref_u8: np.ndarray, test_u8: np.ndarray) -> float:
    """MS-SSIM in [0, 1] of two uint8 [H, W, 3] images (pytorch-msssim, data_range 255, five scales).

    Returns nan for images whose smaller side is under MS_SSIM_MIN_SIDE (161) pixels: five scales do not fit.
    """
    ref, test = _rgb(ref_u8), _rgb(test_u8)
    if ref.shape != test.shape:
        raise ValueError(f"image shapes differ: {ref.shape} vs {test.shape}")
    if min(ref.shape[:2]) < MS_SSIM_MIN_SIDE:
        return float("nan")
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))[None]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a measurement, not a timed step: small convolutions only lose to thread start-up
    try:
        with torch.no_grad():
            return float(_ms_ssim(tensor(ref), tensor(test), data_range=255.0, size_average=True,
                                  win_size=MS_SSIM_WINDOW))
    finally:
        torch.set_num_threads(threads)


def bpp(nbytes: int, height: int, width: int) -> float:
    """Bits per pixel of a stream of `nbytes` bytes for an image of height x width pixels."""
    if height < 1 or width < 1:
        raise ValueError(f"image of {width}x{height} pixels has no area")
    return 8.0 * nbytes / (height * width)
