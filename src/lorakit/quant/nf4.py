"""Blockwise 4-bit (NF4, FP4) and 8-bit storage of frozen weights, in plain PyTorch.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) stores each frozen weight as
``w ~= code[q] * absmax_block``: the tensor is cut into blocks of ``blocksize`` (64) consecutive elements
(row-major order of the (out, in) weight), each block is scaled by its absolute maximum into [-1, 1] and
every element is rounded to the nearest of 16 code values. Two 4-bit codes share one byte, the first
element in the high nibble (bitsandbytes' layout, so packed bytes compare byte-for-byte).

NF4 is the 16-value "NormalFloat" code: quantiles of N(0, 1) scaled to [-1, 1] with an exact 0 (paper
section 3). Double quantization (section 3) stores the fp32 absmax constants again in 8 bits: their
mean is subtracted and they are quantized blockwise (256 per block) with the signed 8-bit dynamic map
of Dettmers 2015 (https://arxiv.org/abs/1511.04561). Cost per parameter:
4 + 8/64 + 32/(64*256) = 4.127 bits instead of 4 + 32/64 = 4.5.

Rounding is to the nearest code (ties to the lower code), exactly like bitsandbytes' 4-bit quantizer.
bitsandbytes' CPU 8-bit quantizer (used for the absmax constants) searches its code table on a
2**-15 grid and so rounds a value within ~1.5e-5 of a midpoint either way. Ours is exactly nearest,
so double-quantized absmax codes differ from bitsandbytes' by one step on a small fraction of the
constants (0.2% on a 4096x4096 N(0,1) matrix; tests/quant/test_nf4.py states the tolerance).

Everything here is a pure function over tensors (4-bit dequantization may hand off to bitsandbytes' compiled
op: ``lorakit.quant.kernel``); ``lorakit.quant.linear`` builds the layer on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.quant import kernel

QUANT_TYPES = ("nf4", "fp4", "int8")

# bitsandbytes get_4bit_type("nf4"): QLoRA's NormalFloat-4 levels (index = stored 4-bit code).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
# bitsandbytes get_4bit_type("fp4"): 1 sign, 2 exponent, 1 mantissa bits, normalised by the max 6.
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204,
    0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5,
    -0.1666666716337204, -0.25,
)  # fmt: skip

# Elements processed per step when (de)quantizing: bounds the temporaries (~4M elements).
CHUNK_ELEMENTS = 1 << 22
# Code bytes dequantized per pass on CPU (64K weights): the fp32 temporaries (256 KiB) stay in the core's
# L2 cache. Measured on the benchmark machine: ~2x faster than one pass over a 1376x512 or 4096x4096 weight.
CPU_PASS_BYTES = 1 << 15


class QuantError(ValueError):
    """A tensor, layer or model cannot be quantized (the message names it and what was expected)."""


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is stored: everything needed to read its buffers back.

    Args:
        shape: the logical (out_features, in_features) shape.
        quant_type: "nf4", "fp4" (4-bit codes, two per byte) or "int8" (one signed byte per element).
        blocksize: elements per absmax block.
        double_quant: absmax stored as uint8 codes + fp32 second-level absmax + fp32 offset.
        double_quant_blocksize: absmax constants per second-level block.
    """

    shape: tuple[int, int]
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    double_quant_blocksize: int = 256

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.numel // self.blocksize

    @property
    def bits(self) -> int:
        return 8 if self.quant_type == "int8" else 4


def check_spec(spec: QuantSpec, what: str = "weight") -> None:
    """Raise QuantError unless ``spec`` can store a tensor (names ``what`` in the message)."""
    if spec.quant_type not in QUANT_TYPES:
        raise QuantError(
            f"{what}: quant type {spec.quant_type!r} is not supported; expected one of {QUANT_TYPES}"
        )
    for name in ("blocksize", "double_quant_blocksize"):
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 2 or v & (v - 1):
            raise QuantError(f"{what}: {name}={v!r} is invalid; expected a power of two >= 2 (e.g. 64)")
    if spec.numel == 0 or spec.numel % spec.blocksize:
        raise QuantError(
            f"{what}: blocksize={spec.blocksize} does not divide its {spec.numel} elements "
            f"(shape {tuple(spec.shape)}); use a smaller power-of-two blocksize or skip this layer"
        )


def code_table(quant_type: str) -> torch.Tensor:
    """The fp32 level table indexed by stored code (nf4/fp4: 16 levels; int8: q/127 for q in -128..127)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(FP4_CODE, dtype=torch.float32)
    if quant_type == "int8":
        return torch.arange(-128, 128, dtype=torch.float32) / 127.0
    raise QuantError(f"quant type {quant_type!r} is not supported; expected one of {QUANT_TYPES}")


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic quantization map (Dettmers 2015), 256 sorted values in [-0.993, 1].

    Exponent e = 0..6 selects a decade 10**(e-6); the remaining bits (2**e levels) split [0.1, 1] of
    that decade linearly, each level being the midpoint of its interval; both signs, plus 0 and 1.
    Same construction (and float32 arithmetic) as bitsandbytes' ``create_dynamic_map()``.
    """
    values: list[float] = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        level = (10 ** (e - 6)) * mids
        values += level.tolist() + (-level).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


_DYNAMIC_MAPS: dict[torch.device, torch.Tensor] = {}


def _dynamic_map_on(device: torch.device) -> torch.Tensor:
    if device not in _DYNAMIC_MAPS:
        _DYNAMIC_MAPS[device] = dynamic_map().to(device)
    return _DYNAMIC_MAPS[device]


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (ties to the lower value) for values already in [-1, 1]."""
    order = torch.argsort(code)
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    idx = torch.bucketize(scaled, bounds, out_int32=True)
    if torch.equal(order, torch.arange(code.numel(), device=code.device)):
        return idx
    return order.to(torch.int32)[idx]


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, blocksize) fp32 values scaled into [-1, 1], and their (blocks,) absmax."""
    blocks = flat.float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1)
    return scaled, absmax


def quantize_blockwise(
    weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float tensor blockwise (row-major element order).

    Returns:
        codes: uint8 (numel/2,) with two 4-bit codes per byte (first element high nibble) for
            nf4/fp4; int8 (numel,) for int8 (round(w * 127 / absmax)).
        absmax: fp32 (numel/blocksize,) per-block absolute maxima.
    """
    spec = QuantSpec((1, weight.numel()), quant_type, blocksize, False)
    check_spec(spec, "tensor")
    if not weight.is_floating_point():
        raise QuantError(f"tensor: expected a floating-point tensor, got {weight.dtype}")
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    int8 = quant_type == "int8"
    out_codes = torch.empty(
        n if int8 else n // 2, dtype=torch.int8 if int8 else torch.uint8, device=flat.device
    )
    absmax = torch.empty(n // blocksize, dtype=torch.float32, device=flat.device)
    code = None if int8 else code_table(quant_type).to(flat.device)
    step = max(blocksize, CHUNK_ELEMENTS // blocksize * blocksize)
    for start in range(0, n, step):
        stop = min(n, start + step)
        scaled, am = _blockwise_absmax(flat[start:stop], blocksize)
        if not torch.isfinite(am).all():  # a NaN/Inf element makes its block's absmax non-finite
            raise QuantError(f"tensor {tuple(weight.shape)} holds NaN or Inf values; cannot quantize it")
        absmax[start // blocksize : stop // blocksize] = am
        scaled = scaled.reshape(-1)
        if int8:
            out_codes[start:stop] = torch.round(scaled * 127.0).to(torch.int8)
        else:
            q = _nearest_code(scaled, code).to(torch.uint8)
            out_codes[start // 2 : stop // 2] = (q[0::2] << 4) | q[1::2]
    return out_codes, absmax


def _pair_table(quant_type: str) -> torch.Tensor:
    """(256,) int64: the two fp32 levels held in each possible byte (high nibble first), as one 8-byte word.

    Looking a byte up in this 1-D table with ``index_select`` writes both levels of the byte in one
    8-byte copy; the result viewed as fp32 is the element sequence (the view keeps memory order, so it is
    endian-safe). On CPU this is many times faster than advanced indexing of a (256, 2) float table.
    """
    code = code_table(quant_type)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous().view(torch.int64).reshape(256)


_PAIR_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _pair_table_on(quant_type: str, device: torch.device) -> torch.Tensor:
    table = _PAIR_TABLES.get((quant_type, device))
    if table is None:
        table = _PAIR_TABLES[(quant_type, device)] = _pair_table(quant_type).to(device)
    return table


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise` for whole blocks: flat tensor of ``dtype``.

    ``codes`` covers ``absmax.numel()`` consecutive blocks. Each value is level * absmax computed in fp32
    and rounded once to ``dtype`` (as bitsandbytes does, so a bf16 result equals the fp32 one cast to
    bf16 bit for bit); the multiply writes ``dtype`` directly, with no separate cast pass. On CPU the
    work goes in passes of ``CPU_PASS_BYTES`` code bytes so the fp32 temporaries stay in cache. ``out``:
    a contiguous tensor of ``dtype`` with one element per weight to write into (returned, viewed flat).
    4-bit codes go through bitsandbytes' compiled op when it is installed (``lorakit.quant.kernel``: bit for
    bit the same, ~3x faster on CPU); the passes below are the reference and the fallback.
    """
    n_blocks = absmax.numel()
    if out is None and quant_type != "int8":  # bitsandbytes' compiled op, when installed: the same bits
        fast = kernel.dequantize_4bit(codes, absmax.float().contiguous(), blocksize, quant_type,
                                      n_blocks * blocksize, dtype)
        if fast is not None:
            return fast
    if out is None:
        out = torch.empty(n_blocks * blocksize, dtype=dtype, device=codes.device)
    out_blocks = out.view(n_blocks, blocksize)
    codes = codes.reshape(-1)
    scale = absmax.to(torch.float32).unsqueeze(1)  # (blocks, 1)
    block_bytes = blocksize if quant_type == "int8" else blocksize // 2
    # compiled (torch.compile), one pass: inductor fuses it without the temporaries the passes keep in cache
    passes = codes.device.type == "cpu" and not torch.compiler.is_compiling()
    step = max(1, CPU_PASS_BYTES // block_bytes) if passes else n_blocks
    table = None if quant_type == "int8" else _pair_table_on(quant_type, codes.device)
    for b0 in range(0, n_blocks, max(1, step)):
        b1 = min(n_blocks, b0 + step)
        part = codes[b0 * block_bytes : b1 * block_bytes]
        if table is None:
            vals = part.to(torch.float32).mul_(1.0 / 127.0)
        else:  # one 8-byte copy per byte: its two fp32 levels
            vals = table.index_select(0, part.to(torch.int32)).view(torch.float32)
        torch.mul(vals.view(b1 - b0, blocksize), scale[b0:b1], out=out_blocks[b0:b1])
    return out.view(-1)


def double_quantize(
    absmax: torch.Tensor, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the fp32 absmax constants to 8 bits (QLoRA double quantization).

    c = absmax - mean(absmax) is quantized blockwise (``blocksize`` per block, the last block may be
    partial) to the nearest value of the signed dynamic map, scaled by the block's max |c|.

    Returns:
        qabsmax: uint8 (n,) codes; absmax2: fp32 (ceil(n/blocksize),) second-level scales;
        offset: fp32 0-dim mean.
    """
    absmax = absmax.detach().float().reshape(-1)
    offset = absmax.mean()
    centered = absmax - offset
    n = centered.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(centered, (0, pad)).reshape(-1, blocksize)
    absmax2 = blocks.abs().amax(dim=1)
    scaled = torch.where(absmax2.unsqueeze(1) > 0, blocks / absmax2.clamp(min=1e-38).unsqueeze(1), 0.0)
    q = _nearest_code(scaled.clamp(-1, 1).reshape(-1)[:n], _dynamic_map_on(centered.device))
    return q.to(torch.uint8), absmax2, offset


def double_dequantize(
    qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    """Inverse of :func:`double_quantize`: fp32 (n,) absmax constants."""
    n = qabsmax.numel()
    vals = _dynamic_map_on(qabsmax.device).index_select(0, qabsmax.reshape(-1).to(torch.int32))
    if n % blocksize:
        vals = torch.nn.functional.pad(vals, (0, (-n) % blocksize))
    vals = vals.view(-1, blocksize).mul_(absmax2.float().unsqueeze(1))
    return vals.view(-1)[:n].add_(offset.float())
