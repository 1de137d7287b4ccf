"""Model FLOPs utilization (MFU, PaLM, arXiv 2204.02311, appendix B): the FLOPs a step needs, counted on the real
model and batch, per second, as a share of the device's peak. Counted, not estimated: PyTorch's FlopCounterMode
adds up every matmul and convolution the step runs, forward and backward (2 FLOPs per multiply-add)."""

from __future__ import annotations

from typing import Callable

from torch.utils.flop_counter import FlopCounterMode

# Dense peak TFLOP/s from the vendors' data sheets (no 2:4 sparsity): tensor-core bf16/fp16 with fp32 accumulation,
# TF32 and plain fp32. A device is found by the first key contained in torch.cuda.get_device_name(); order matters
# ("L40S" before "L4", "H100 PCIe" before "H100").
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def peak_tflops(device_name: str, precision: str, allow_tf32: bool = False) -> float | None:
    """The table's peak for `device_name` at the run's --mixed_precision (no: fp32, or TF32 when allowed); None when
    the device or precision is not in it (then give --peak_tflops)."""
    kind = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "tf32" if allow_tf32 else "fp32")
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(kind)
    return None


def count_flops(fn: Callable[[], object]) -> int:
    """The FLOPs of one call of `fn` (run for real), forward and backward."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def mfu(flops: int, seconds: float, peak: float | None) -> tuple[float, float | None]:
    """(achieved TFLOP/s, its share of `peak` TFLOP/s, None without a peak)."""
    achieved = flops / seconds / 1e12
    return achieved, (achieved / peak if peak else None)
