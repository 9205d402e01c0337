"""Every runtime path of a quantized Linear (quant_paths.py) against the dequantize-per-call path."""
import pytest
import torch

import quant_paths
from gptq_format import pack
from quant_paths import QuantLinear

# fp32 outputs of O(1): the paths differ from the reference only in summation order (or, for the CPU int4
# kernel, in its own blocking), far below one quantization step
TOL = 1e-4


def random_quant_linear(bits, group_size, I=96, O=64, permuted=False, bias=False, seed=0):
    """A QuantLinear with random codes, zero points and fp16 scales; `permuted` gives g_idx the shape that
    act-order checkpoints of other GPTQ tools have (groups in order of a column permutation)."""
    g = torch.Generator().manual_seed(seed)
    gs = I if group_size == -1 else group_size
    G = -(-I // gs)
    q = QuantLinear(I, O, bits, group_size, bias=bias)
    codes = torch.randint(0, 2**bits, (O, I), generator=g)
    zeros = torch.randint(1, 2**bits, (G, O), generator=g)
    scales = (torch.rand(G, O, generator=g) * 0.05 + 0.005).half()
    g_idx = torch.arange(I) // gs
    if permuted:
        g_idx = g_idx[torch.argsort(torch.rand(I, generator=g))]
    for k, v in pack(codes, scales, zeros, g_idx, bits).items():
        getattr(q, k).copy_(v)
    if bias:
        q.bias.copy_(torch.randn(O, generator=g))
    return q


def check(q, path, x):
    with torch.no_grad():
        want = q(x)  # before prepare(): the dequantize-per-call path
        q.prepare(path)
        got = q(x)
    assert q.path == path and got.shape == want.shape
    assert (got - want).abs().max().item() < TOL * max(1.0, want.abs().max().item()), path


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("order", ["g32", "ragged-g64", "per-channel", "act-order-g32"])
@pytest.mark.parametrize("path", ["unpacked", "dequantized"])
def test_fallback_paths_equal_the_dequantize_path(bits, order, path):
    gs = {"g32": 32, "ragged-g64": 64, "per-channel": -1, "act-order-g32": 32}[order]
    q = random_quant_linear(bits, gs, permuted=order.startswith("act"), bias=bits == 3)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(1))  # (B, T, I)
    check(q, path, x)


@pytest.mark.parametrize("order", ["g32", "ragged-g64", "per-channel", "act-order-g32"])
def test_int4_kernel_form_equals_the_dequantize_path_on_the_cpu_op(order):
    """The CPU build of the int4 op shares the CUDA kernel's scale-and-zero form: this checks the GPTQ -> kernel
    mapping (zero = s * (8 - z)), the padding and the column order on any machine."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 weight-only matmul")
    gs = {"g32": 32, "ragged-g64": 64, "per-channel": -1, "act-order-g32": 32}[order]
    q = random_quant_linear(4, gs, permuted=order.startswith("act"))
    check(q, "int4-kernel", torch.randn(3, 96, generator=torch.Generator().manual_seed(2)))


def test_int8_kernel_form_with_zero_point_correction_equals_the_dequantize_path():
    q = random_quant_linear(8, -1, bias=True)
    check(q, "int8-kernel", torch.randn(4, 96, generator=torch.Generator().manual_seed(3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA here: this test checks the int4/int8 CUDA kernels "
                    "(quant_paths.check_cuda_kernels()) on a machine with CUDA")
def test_cuda_kernels_equal_the_dequantize_path():
    for path, bits, gs, err, ok, note in quant_paths.check_cuda_kernels():
        assert ok, f"{path} {bits}-bit g{gs}: relative error {err}, {note}"


def test_auto_picks_unpacked_on_cpu_and_refuses_impossible_kernels(monkeypatch):
    monkeypatch.setattr(quant_paths, "kernel_runs", lambda path, device: True)  # as on a GPU with the kernels
    q = random_quant_linear(4, 32)
    assert quant_paths.choose("auto", q, "cpu") == "unpacked"
    assert quant_paths.choose("auto", q, "cuda") == "int4-kernel"
    assert quant_paths.choose("auto", random_quant_linear(3, 32), "cuda") == "unpacked"
    assert quant_paths.choose("auto", random_quant_linear(8, 32), "cuda") == "unpacked"  # int8 op: per-channel only
    assert quant_paths.choose("auto", random_quant_linear(8, -1), "cuda") == "int8-kernel"
    with pytest.raises(ValueError, match="int8-kernel needs 8 bits"):
        quant_paths.choose("int8-kernel", q, "cpu")


def test_unpacked_reads_a_byte_per_weight_and_keeps_the_state_dict():
    q = random_quant_linear(4, 128, I=256)
    keys = set(q.state_dict())
    q.prepare("unpacked")
    assert set(q.state_dict()) == keys  # runtime buffers are not part of the checkpoint format
    # uint8 codes plus fp32 scale and zero per group of 128: 1 + 8/128 bytes a weight
    assert q.bytes_read() == q.in_features * q.out_features * (1 + 8 / 128)
