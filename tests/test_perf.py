"""FLOP counting and MFU: matmul FLOPs are counted as 2 per multiply-add, forward and backward, and devices find
their peaks."""

import pytest
import torch

from lcm_lora.perf import count_flops, mfu, peak_tflops


def test_a_linear_layers_forward_and_backward_flops_are_counted():
    b, n_in, n_out = 8, 32, 16
    layer = torch.nn.Linear(n_in, n_out, bias=False)
    x = torch.randn(b, n_in, requires_grad=True)
    forward = count_flops(lambda: layer(x))
    assert forward == 2 * b * n_in * n_out
    # backward: the gradient of the input and of the weight, one matmul each
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * forward


def test_mfu_is_the_achieved_rate_over_the_peak():
    achieved, share = mfu(500e12, 2.0, 1000.0)
    assert achieved == 250.0 and share == 0.25
    assert mfu(1e12, 1.0, None) == (1.0, None)


@pytest.mark.parametrize("name, precision, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4),
    ("NVIDIA H100 PCIe", "fp16", False, 756.0),
    ("NVIDIA H200", "bf16", False, 989.4),
    ("NVIDIA A100-SXM4-80GB", "no", True, 156.0),
    ("NVIDIA A100-SXM4-80GB", "no", False, 19.5),
    ("NVIDIA L40S", "bf16", False, 362.1),
    ("NVIDIA L4", "bf16", False, 121.0),
    ("Tesla V100-SXM2-16GB", "bf16", False, None),  # no bf16 tensor cores
    ("cpu", "no", False, None),
])
def test_devices_find_their_peak(name, precision, tf32, peak):
    assert peak_tflops(name, precision, tf32) == peak
