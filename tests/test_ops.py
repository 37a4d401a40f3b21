"""Which ops autocast lowers, their names across graph kinds, and their FLOP estimates."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from precsearch.runtime.ops import (
    ELIGIBLE_OPS, device_type_of, estimate_flops, is_eligible, model_device_type, module_op, op_name,
)


def test_op_name_normalises_overloads_functions_strings_and_aliases():
    assert op_name(torch.ops.aten.addmm.default) == "addmm"          # an overload: its schema name
    assert op_name(torch.ops.aten.convolution_backward.default) == "convolution_backward"
    assert op_name(torch.ops.aten.mm) == "mm"                         # an overload packet
    assert op_name(torch.matmul) == "matmul"
    assert op_name(F.linear) == "linear"
    assert op_name("conv2d") == "conv2d"
    assert op_name("__matmul__") == "matmul"                          # FX's method spelling
    assert op_name("__rmatmul__") == "matmul"
    assert op_name(torch.Tensor.__matmul__) == "matmul"
    assert op_name("relu") == "relu"


def test_is_eligible_per_device_type():
    for name in ("linear", "mm", "addmm", "bmm", "conv2d", "convolution", "scaled_dot_product_attention"):
        assert is_eligible(name, "cpu") and is_eligible(name, "cuda")
    assert is_eligible("mkldnn_rnn", "cpu") and not is_eligible("mkldnn_rnn", "cuda")
    assert is_eligible("_cudnn_rnn", "cuda") and not is_eligible("_cudnn_rnn", "cpu")
    assert is_eligible("einsum", "cpu") and is_eligible("einsum", "cuda")
    for name in ("relu", "add", "layer_norm", "softmax", "__matmul__", ""):
        assert not is_eligible(name, "cpu") and not is_eligible(name, "cuda")
    assert set(ELIGIBLE_OPS) == {"cpu", "cuda"}


def test_eligible_ops_really_run_in_bf16_under_cpu_autocast():
    """Spot check of the list against autocast itself."""
    x, w = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.bmm(x, w).dtype == torch.bfloat16
        assert (x + w).dtype == torch.float32
    assert is_eligible("bmm", "cpu") and not is_eligible("add", "cpu")


def test_module_op():
    assert module_op(nn.Linear(2, 2)) == "linear"
    assert module_op(nn.Conv2d(1, 1, 3)) == "conv2d"
    assert module_op(nn.ConvTranspose1d(1, 1, 3)) == "conv_transpose1d"
    assert module_op(nn.LSTM(2, 2)) == "mkldnn_rnn"
    assert module_op(nn.MultiheadAttention(4, 2)) == "_native_multi_head_attention"
    assert module_op(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)) == "linear"  # a subclass

    class MyLinear(nn.Linear):
        pass

    assert module_op(MyLinear(2, 2)) == "linear"
    for module in (nn.ReLU(), nn.LayerNorm(2), nn.Sequential(nn.Linear(2, 2)), nn.Embedding(3, 2)):
        assert module_op(module) is None


def test_estimate_flops_linear_and_matmul_family():
    # x (4, 8) @ W.T (8 -> 16): 4*16 outputs, 8 multiply-adds each, x2
    assert estimate_flops("linear", [(4, 8), (16, 8), (16,)], (4, 16)) == 2 * 4 * 16 * 8 == 1024
    assert estimate_flops("mm", [(4, 8), (8, 16)], (4, 16)) == 1024
    assert estimate_flops("matmul", [(4, 8), (8, 16)], (4, 16)) == 1024
    # addmm(bias, a, b): the contraction length comes from the second input
    assert estimate_flops("addmm", [(16,), (4, 8), (8, 16)], (4, 16)) == 1024
    # bmm (2, 3, 5) x (2, 5, 7) -> (2, 3, 7)
    assert estimate_flops("bmm", [(2, 3, 5), (2, 5, 7)], (2, 3, 7)) == 2 * 2 * 3 * 7 * 5 == 420
    assert estimate_flops("baddbmm", [(2, 3, 7), (2, 3, 5), (2, 5, 7)], (2, 3, 7)) == 420


def test_estimate_flops_convolution():
    # x (1, 3, 8, 8), weight (4, 3, 3, 3), no padding -> (1, 4, 6, 6): 144 outputs x 27 taps x 2
    assert estimate_flops("conv2d", [(1, 3, 8, 8), (4, 3, 3, 3), (4,)], (1, 4, 6, 6)) == 2 * 144 * 27 == 7776
    assert estimate_flops("convolution", [(1, 3, 8, 8), (4, 3, 3, 3)], (1, 4, 6, 6)) == 7776
    # conv1d: x (2, 6, 10), weight (5, 6, 4) -> (2, 5, 7)
    assert estimate_flops("conv1d", [(2, 6, 10), (5, 6, 4)], (2, 5, 7)) == 2 * 70 * 24
    assert estimate_flops("conv2d", [(1, 3, 8, 8)], (1, 4, 6, 6)) == 0        # weight shape unknown
    assert estimate_flops("conv2d", [(1, 3, 8, 8), None], (1, 4, 6, 6)) == 0


def test_estimate_flops_matches_a_real_convolution_shape():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    y = conv(x)
    assert estimate_flops("conv2d", [tuple(x.shape), tuple(conv.weight.shape)], tuple(y.shape)) == 7776


def test_estimate_flops_attention():
    # q (1, 2, 5, 8), k (1, 2, 6, 8): QK^T and AV are each 2*B*H*L*S*D
    q, k = (1, 2, 5, 8), (1, 2, 6, 8)
    assert estimate_flops("scaled_dot_product_attention", [q, k, k], q) == 4 * (1 * 2 * 5 * 8) * 6
    assert estimate_flops("_scaled_dot_product_flash_attention_for_cpu", [q], q) == 4 * 80 * 5  # self-attention
    assert estimate_flops("scaled_dot_product_attention", [(5,)], (5,)) == 0


def test_estimate_flops_fallbacks():
    assert estimate_flops("relu", [(3, 4)], (3, 4)) == 12           # unknown op: one per output element
    assert estimate_flops("linear", [(4, 8)], None) == 0
    assert estimate_flops("linear", [(4, 8)], ()) == 0
    assert estimate_flops("mm", [None, (8, 16)], (4, 16)) == 0
    assert estimate_flops("addmm", [(16,)], (4, 16)) == 0


def test_device_type_of():
    assert device_type_of("cpu") == "cpu"
    assert device_type_of("cuda:1") == "cuda"
    assert device_type_of(torch.device("cuda", 0)) == "cuda"
    with pytest.raises(ValueError, match="'meta' is not supported"):
        device_type_of("meta")
    with pytest.raises(ValueError, match="use cpu or cuda"):
        device_type_of(torch.device("meta"))


def test_model_device_type():
    assert model_device_type(nn.Linear(2, 2)) == "cpu"
    assert model_device_type(nn.BatchNorm1d(3, affine=False)) == "cpu"      # buffers only
    assert model_device_type(nn.ReLU()) == "cpu"                            # nothing: the fallback
    assert model_device_type(nn.ReLU(), fallback="cuda:0") == "cuda"
    assert model_device_type(nn.Linear(2, 2), fallback="cuda") == "cpu"     # parameters win
    with pytest.raises(ValueError):
        model_device_type(nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError):
        model_device_type(nn.ReLU(), fallback="meta")
