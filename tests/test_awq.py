"""AWQ W4A16: nibble packing, quantization error, fused-shard loading and the two matmul paths (CPU only)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.common.weights import load_weights, same_name
from services.llm_decoder.models.awq import (ORDER, AWQLinear, awq_matmul, dequantize, nibble_pairs, pack, quantize,
                                            unpack)


def test_pack_unpack_round_trip_including_sign_bit():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (7, 64), generator=g, dtype=torch.int32)
    values[:, 7::8] = torch.randint(8, 16, (7, 8), generator=g, dtype=torch.int32)  # channel 7 = slot 7 = bit 31
    packed = pack(values)
    assert packed.dtype == torch.int32 and packed.shape == (7, 8)
    assert (packed < 0).all()  # every word has its sign bit set, and still unpacks exactly
    assert torch.equal(unpack(packed), values)
    words = torch.randint(-2 ** 31, 2 ** 31, (5, 3), generator=g, dtype=torch.int64).to(torch.int32)
    assert torch.equal(pack(unpack(words)), words)


def test_nibble_slot_maps_to_channel_order():
    slots = [3, 9, 1, 12, 5, 0, 7, 15]                       # value stored in nibble slot i of the word
    word = sum(v << (4 * i) for i, v in enumerate(slots))
    word -= 2 ** 32 if word >= 2 ** 31 else 0                   # as int32
    packed = torch.tensor([[0, word]], dtype=torch.int32)       # column c = 1 -> channels 8..15
    channels = unpack(packed)[0]
    for i, v in enumerate(slots):
        assert channels[8 + ORDER[i]] == v
    assert torch.equal(channels[:8], torch.zeros(8, dtype=torch.int32))
    assert torch.equal(pack(channels[None]), packed)
    with pytest.raises(ValueError):
        pack(torch.full((1, 8), 16))


def _group_scale(weight: torch.Tensor, group: int) -> torch.Tensor:
    """The test's own scale per (out channel, group), expanded back to [N, K]."""
    w = weight.double().view(weight.shape[0], -1, group)
    scale = (w.amax(-1) - w.amin(-1)).clamp(min=1e-5) / 15
    return scale.repeat_interleave(group, dim=1)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_quantize_dequantize_within_quantization_error(scale_dtype):
    n, k, group = 48, 256, 64
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    packed = quantize(weight, group, scale_dtype=scale_dtype)
    assert packed["qweight"].shape == (k, n // 8) and packed["qzeros"].shape == (k // group, n // 8)
    assert packed["scales"].shape == (k // group, n) and packed["scales"].dtype == scale_dtype
    scale = _group_scale(weight, group)
    assert torch.allclose(packed["scales"].double().t().repeat_interleave(group, dim=1), scale, rtol=2 ** -10)
    deq = dequantize(packed["qweight"], packed["qzeros"], packed["scales"], group, torch.float32)
    assert deq.shape == (n, k) and deq.dtype == torch.float32
    # Rounding costs at most half a step; an fp16-stored scale (relative error <= 2^-11) can stretch the
    # clamped top nibble by up to 15 steps' worth of that error.
    slack = 0.0 if scale_dtype == torch.float32 else (1 + 2 ** -11) * 15 * 2 ** -11 + 2 ** -12
    bound = scale * (0.5 + slack) + 1e-7
    assert ((weight.double() - deq.double()).abs() <= bound).all()
    assert dequantize(packed["qweight"], packed["qzeros"], packed["scales"], group).dtype == scale_dtype


SIZES = {"q": 64, "k": 32, "v": 32}
K, GROUP = 128, 64


def _shards(seed: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, rows in SIZES.items():
        out[name] = quantize(torch.randn(rows, K, generator=g), GROUP)
        out[name]["bias"] = torch.randn(rows, generator=g).half()
    return out


def _reference(shards, x):
    w = torch.cat([dequantize(s["qweight"], s["qzeros"], s["scales"], GROUP, x.dtype) for s in shards.values()])
    return F.linear(x, w, torch.cat([s["bias"] for s in shards.values()]).to(x.dtype))


def _fused_layer(shards) -> AWQLinear:
    layer = AWQLinear(K, sum(SIZES.values()), bias=True, group_size=GROUP, shards=SIZES)
    params = dict(layer.named_parameters())
    with torch.no_grad():
        for shard, tensors in shards.items():
            for name, tensor in tensors.items():
                layer.load_shard(params[name], tensor, shard)
    return layer


def test_fused_shards_forward_matches_dense():
    shards = _shards()
    layer = _fused_layer(shards)
    assert layer.shards == ("q", "k", "v") and layer.offsets == {"q": (0, 64), "k": (64, 32), "v": (96, 32)}
    assert all(not p.requires_grad for p in layer.parameters())
    assert torch.equal(layer.qweight, torch.cat([s["qweight"] for s in shards.values()], dim=1))
    assert torch.equal(layer.qzeros, torch.cat([s["qzeros"] for s in shards.values()], dim=1))
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer(x), _reference(shards, x), rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    assert layer(xb).dtype == torch.bfloat16
    torch.testing.assert_close(layer(xb), _reference(shards, xb))
    with pytest.raises(ValueError, match="shard k"):
        layer.load_shard(layer.qweight, shards["q"]["qweight"], "k")


def test_reloading_a_shard_invalidates_the_dense_cache():
    layer = _fused_layer(_shards(seed=2))
    x = torch.randn(3, K)
    layer(x)
    new = _shards(seed=4)
    with torch.no_grad():
        layer.load_shard(layer.scales, new["v"]["scales"], "v")
        layer.load_shard(layer.qweight, new["v"]["qweight"], "v")
        layer.load_shard(layer.qzeros, new["v"]["qzeros"], "v")
    shards = _shards(seed=2)
    shards["v"].update({key: new["v"][key] for key in ("qweight", "qzeros", "scales")})
    torch.testing.assert_close(layer(x), _reference(shards, x), rtol=1e-5, atol=1e-5)


class _Reader:
    """Stands in for TensorReader: tensors from a dict."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.path, self.tensors_by_name = Path("fake"), tensors

    def tensors(self, wanted, desc=""):
        return ((name, t) for name, t in self.tensors_by_name.items() if wanted(name))


def _checkpoint_name(name: str, tensor: torch.Tensor):
    proj, param = name.split(".")   # "q_proj.qweight" -> parameter "qweight", shard "q"
    return [(param, proj.removesuffix("_proj"), tensor)]


def test_generic_loader_fills_shards_and_detects_missing_ones():
    shards = _shards()
    tensors = {f"lm.{s}_proj.{p}": t for s, d in shards.items() for p, t in d.items()}
    layer = AWQLinear(K, 128, bias=True, group_size=GROUP, shards=SIZES)
    load_weights(layer, _Reader(tensors), "lm.", _checkpoint_name)
    x = torch.randn(2, K)
    torch.testing.assert_close(layer(x), _reference(shards, x), rtol=1e-5, atol=1e-5)

    partial = {name: t for name, t in tensors.items() if not name.startswith("lm.v_proj")}
    with pytest.raises(ValueError, match=r"missing tensors for .*qweight\[v\]"):
        load_weights(AWQLinear(K, 128, bias=True, group_size=GROUP, shards=SIZES), _Reader(partial), "lm.",
                     _checkpoint_name)


def test_unfused_layer_loads_whole_tensors_and_survives_meta_build():
    with torch.device("meta"):
        layer = AWQLinear(K, 32, bias=False, group_size=GROUP)
    layer = layer.to(torch.float16).to_empty(device="cpu")  # as load_language_model builds models
    assert layer.shards == (None,) and layer.qweight.dtype == torch.int32
    packed = quantize(torch.randn(32, K), GROUP)
    load_weights(layer, _Reader({f"o.{n}": t for n, t in packed.items()}), "o.", same_name)
    x = torch.randn(4, K, dtype=torch.float16)
    expected = F.linear(x, dequantize(packed["qweight"], packed["qzeros"], packed["scales"], GROUP, x.dtype))
    torch.testing.assert_close(layer(x), expected)


def test_awq_matmul_equals_dense_path():
    shards = _shards()
    layer = _fused_layer(shards)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, K, dtype=dtype)                 # leading dims pass through
        out = awq_matmul(x, layer.qweight, layer.qzeros, layer.scales, GROUP, layer.bias)
        assert out.shape == (2, 3, 128) and out.dtype == dtype
        assert torch.equal(out, layer(x))


def test_nibble_pairs_put_the_even_k_in_the_high_nibble():
    """The bytes torch's CUDA int4 kernel is packed from (only a GPU runs it: bench.awq checks its results there)."""
    q = torch.tensor([[1, 2, 15, 0], [0, 15, 7, 8]], dtype=torch.int32)
    assert nibble_pairs(q).tolist() == [[0x12, 0xF0], [0x0F, 0x78]]
