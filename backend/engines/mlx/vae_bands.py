"""Row-band execution of the VAE decoder (and encoder) on the CPU: the same function in a third of the time
and memory.

Why: MLX's CPU convolution unfolds its whole input before one matrix product (9x the activation,
2.3 GiB for the 512x512x256 upsampler convolution), and every elementwise op of a layer writes a
full-size array; all of it spills out of cache and faults fresh pages in. Here an activation is a
list of row bands (`Rows`), each evaluated as soon as it is made: a layer reads its input rows
plus a one-row halo on each side, normalizes, activates and convolves them while they are in
cache, so only the bands themselves live between layers, and an input's bands are freed once
every output row that needs them is done. Convolutions use Winograd F(4x4, 3x3) (winograd.py:
1/4 of the multiplications), in fp32 for any activation dtype (MLX's fp16 CPU convolution is
several times slower than its fp32 one); bands keep the model's dtype. At inference (under
cpu_kernels.eager_chunks) the norms, activations and moments run on cpu_rowwise's numpy kernels, and every
convolution runs in numpy from end to end, the normalized and activated (or upsampled) rows written straight into
its input band: cpu_winograd's F(4x4) on every core (`_fused_winograd_band`; SD 1.5's decode at 512x512 9.3 ->
6.7 s against MLX-kernel transforms), or, for the layers with few channels on one side (the first and the last),
cpu_conv's nine shifted oneMKL products (`_fused_shifted_band`).

Exactness: a band computes what the whole layer computes for its rows (a 3x3 convolution sees
one neighbouring row on each side, which the halo supplies; the zero padding stays at the image
border). GroupNorm statistics are global: each band's group means and centred sums of squares
are taken while it is in cache and combined over all bands (Chan's formula) before any band is
normalized. Rounding differs: an SD 1.5 decode (random weights, 256 px) is 1.1e-5 from a float64
reference with Winograd F(4x4), 2e-6 with the direct convolution, 5e-6 for the one-graph decoder.

vae.Decoder uses `decode` (and vae.Encoder `encode`: the same layers, plus the stride-2 downsampling
convolution, by MLX's convolution band by band) on the CPU whenever arrays can be evaluated, which includes under
mx.grad (evaluated arrays keep their graph) but not inside mx.compile or mx.vmap, and when its
convolutions are not quantized (`applies`).

On a GPU (or a CPU where the compiled kernels cannot run) the bands are used for large images only (above
DEVICE_BAND_PIXELS output pixels: SDXL's 1024x1024 decodes in bands, SD 1.5's 512x512 in one graph), with bands
of DEVICE_BAND_BYTES, MLX's own convolution in the activations' dtype (no Winograd) and MLX's own activation:
the one-graph decoder holds several full-size activations at once (GiBs at 1024x1024), the bands about one.
"""
from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from backend import interrupt

from backend.engines.mlx import cpu_conv, cpu_kernels, cpu_pool, cpu_rowwise, cpu_winograd, layers, winograd

# The output rows evaluated at once. Larger bands make larger products: SD 1.5's decode at 512x512 took 12.2 s with
# 4 MiB bands (peak 0.98 GiB), 10.2 s with 16 MiB (1.16 GiB), 10.0 s with 32 MiB (1.41 GiB), before the fused path.
BAND_BYTES = 32 << 20
WINOGRAD_TILE = 4  # convolutions by F(4x4, 3x3); 2 for F(2x2, 3x3), 0 for MLX's (in small calls)
UNFOLD_BYTES = 6 << 20  # a convolution call's unfolded input (rows x width x 9 x channels)
# Elsewhere than on the fast CPU path (a GPU): bands only above this many output pixels (batch included), of
# this many bytes (fewer, larger calls: a GPU needs work per call, and each band is a synchronisation).
DEVICE_BAND_PIXELS = 1 << 19
DEVICE_BAND_BYTES = 64 << 20
# MLX keeps freed buffers for reuse only up to its cache limit (32 MiB by default); a band's
# temporaries need more, and without reuse every band faults fresh pages in.
CACHE_BYTES = 128 << 20

RowSource = Callable[[int, int], mx.array]  # (first, end) -> those rows, (B, end - first, W, C)


def can_evaluate(x: mx.array) -> bool:
    """False inside mx.compile / mx.vmap, where MLX refuses to evaluate (and the graph must stay whole)."""
    try:
        mx.eval(x)
        return True
    except ValueError:
        return False


def supports(decoder) -> bool:
    """Whether the bands can run `decoder`: they read plain (not quantized) kernels directly."""
    return not any("scales" in module for _, module in decoder.named_modules())


def _fast_cpu() -> bool:
    """The CPU with its compiled kernels (cpu_kernels, Winograd): bands at every size, tuned for its caches."""
    return cpu_kernels.available()


def applies(module, x: mx.array, scale: int = 1) -> bool:
    """Whether vae.Encoder / vae.Decoder `module` runs band by band on input `x`, whose output has `scale`^2 times
    its pixels: on the fast CPU path always, elsewhere above DEVICE_BAND_PIXELS output pixels; never for quantized
    convolutions or where MLX cannot evaluate (inside mx.compile / mx.vmap)."""
    if not _fast_cpu() and x.shape[0] * x.shape[1] * x.shape[2] * scale * scale <= DEVICE_BAND_PIXELS:
        return False
    return supports(module) and can_evaluate(x)


def _band_bytes() -> int:
    return BAND_BYTES if _fast_cpu() else DEVICE_BAND_BYTES


def _unfold_bytes() -> int:
    return UNFOLD_BYTES if _fast_cpu() else 9 * DEVICE_BAND_BYTES  # one convolution call per band


def _winograd_tile() -> int:
    return WINOGRAD_TILE if _fast_cpu() else 0


def _rows_for(bytes_per_row: int, budget: int) -> int:
    return max(1, budget // max(1, bytes_per_row))


class Rows:
    """An NHWC activation held as evaluated row bands, with its GroupNorm moments per band."""

    def __init__(self, bands: list, moments: Optional[list] = None):
        self.bands = bands
        self.moments = moments  # per band: (count, mean (B, G), centred sum of squares (B, G))
        self.starts = [0]
        for band in bands:
            self.starts.append(self.starts[-1] + band.shape[1])
        self.height = self.starts[-1]

    @classmethod
    def of(cls, x: mx.array, groups: Optional[int]) -> "Rows":
        rows = _rows_for(x.shape[0] * x.shape[2] * x.shape[3] * x.itemsize, _band_bytes())
        bands = [x[:, r:r + rows] for r in range(0, x.shape[1], rows)]
        moments = [_band_moments(band, groups) for band in bands] if groups else None
        mx.eval(bands, moments)
        return cls(bands, moments)

    @property
    def size(self) -> int:
        """Elements of the whole activation."""
        b, _, w, c = next(band for band in self.bands if band is not None).shape
        return b * self.height * w * c

    def take(self, first: int, end: int) -> mx.array:
        """Rows [first, end) as one array (a view when they lie in one band)."""
        pieces = []
        for i, band in enumerate(self.bands):
            lo, hi = max(first, self.starts[i]), min(end, self.starts[i + 1])
            if lo < hi:
                pieces.append(band[:, lo - self.starts[i]:hi - self.starts[i]])
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)

    def release_before(self, row: int) -> None:
        """Free the bands that end at or before `row` (their rows will not be read again)."""
        for i in range(len(self.bands)):
            if self.starts[i + 1] <= row:
                self.bands[i] = None

    def join(self) -> mx.array:
        return mx.concatenate(self.bands, axis=1) if len(self.bands) > 1 else self.bands[0]

    def group_stats(self) -> tuple[mx.array, mx.array]:
        """The global (mean, biased variance) of each (sample, group), fp32, (B, G) each."""
        counts = [m[0] for m in self.moments]
        total = sum(counts)
        means = mx.stack([m[1] for m in self.moments])
        weights = mx.array(counts, dtype=mx.float32).reshape(-1, 1, 1)
        mean = (weights * means).sum(axis=0) / total
        m2 = mx.stack([m[2] for m in self.moments]).sum(axis=0) + (weights * mx.square(means - mean)).sum(axis=0)
        return mean, m2 / total


def _band_moments(band: mx.array, groups: int) -> tuple:
    """(count, group means, centred group sums of squares) of one band."""
    if layers.cpu_inference(band.size):
        return cpu_rowwise.group_moments(band, groups)
    b, r, w, c = band.shape
    flat = band.reshape(b, r * w, c)
    count = r * w * (c // groups)
    mean = flat.astype(mx.float32).sum(axis=1).reshape(b, groups, -1).sum(axis=-1) / count
    per_channel = mx.repeat(mean, c // groups, axis=-1)[:, None, :]
    deviation = cpu_kernels.squared_deviation(flat, per_channel) if _fast_cpu() else \
        mx.square(flat.astype(mx.float32) - per_channel)
    m2 = deviation.sum(axis=1).reshape(b, groups, -1).sum(axis=-1)
    return count, mean, m2


def _norm_act(norm, act, x: Rows) -> RowSource:
    """Rows of act(GroupNorm(x)), with the statistics of the whole of x."""
    mean, var = x.group_stats()
    b, groups = mean.shape
    gamma = norm.weight.astype(mx.float32).reshape(1, groups, -1)
    beta = norm.bias.astype(mx.float32).reshape(1, groups, -1)
    scale_g = mx.rsqrt(var + norm.eps)[..., None] * gamma
    scale = scale_g.reshape(b, 1, 1, -1)
    shift = (beta - mean[..., None] * scale_g).reshape(b, 1, 1, -1)
    if act is layers.silu and layers.cpu_inference(x.size):
        def normalized(first, end):
            return cpu_rowwise.affine_silu(x.take(first, end), scale, shift)
        normalized.into = lambda first, end, dest: cpu_rowwise.affine_silu_into(x.take(first, end), scale, shift, dest)
        return normalized
    if act is layers.silu and _fast_cpu():
        return lambda first, end: cpu_kernels.affine_silu(x.take(first, end), scale, shift)

    def rows(first, end):
        band = x.take(first, end)
        return act((band.astype(mx.float32) * scale + shift).astype(band.dtype))
    return rows


def _upsampled(x: Rows) -> RowSource:
    """Rows of the 2x nearest-neighbour upsampling of x."""
    def rows(first, end):
        src = layers.upsample_nearest(x.take(first // 2, (end + 1) // 2))
        return src[:, first % 2:first % 2 + end - first]

    def into(first, end, dest):
        src = x.take(first // 2, (end + 1) // 2).astype(mx.float32)
        mx.eval(src)
        picked = np.asarray(src)[:, np.arange(first, end) // 2 - first // 2]  # the rows, each twice
        b, r, w, c = picked.shape
        dest.reshape(b, r, w, 2, c)[...] = picked[:, :, :, None, :]  # and each column twice
    rows.into = into
    return rows


def conv3x3(conv, source: RowSource, height: int, groups: Optional[int] = None,
            residual: Optional[RowSource] = None, scale: float = 1.0,
            done_before: Callable[[int], None] = lambda row: None) -> Rows:
    """(conv(source) [+ residual]) / scale as Rows, for a stride-1, padding-1 3x3 `conv`.

    `done_before(row)` is called once no later band reads source rows before `row`.
    """
    weight = conv.weight
    c_out, _, _, c_in = weight.shape
    probe = source(0, 1)
    batch, width, itemsize = probe.shape[0], probe.shape[2], probe.itemsize
    band_rows = _rows_for(batch * width * max(c_in, c_out) * itemsize, _band_bytes())
    in_numpy = layers.cpu_inference(batch * height * width * c_out)
    shifted = in_numpy and cpu_conv.applies(c_in, c_out)
    tile = 0 if shifted else _winograd_tile()
    if shifted:
        taps = cpu_conv.taps(weight)
    elif in_numpy:
        u = cpu_winograd.kernel_transform(cpu_pool.as_numpy(weight)[1][0])
        band_rows = -(-band_rows // cpu_winograd.TILE) * cpu_winograd.TILE
    elif tile:
        u = winograd.transform_weight(weight, tile)
        band_rows = -(-band_rows // tile) * tile
    conv_rows = _rows_for(batch * width * 9 * c_in * itemsize, _unfold_bytes())
    bias = [conv.bias] if "bias" in conv else []
    bands, moments = [], []
    for r0 in range(0, height, band_rows):
        r1 = min(height, r0 + band_rows)
        if shifted:
            out = _fused_shifted_band(source, taps, bias, residual, r0, r1, height, batch, width, c_in, scale)
            out = out.astype(probe.dtype)
        elif in_numpy:
            out = _fused_winograd_band(source, u, bias, residual, r0, r1, height, batch, width, c_in, scale)
            out = out.astype(probe.dtype)
        else:
            inp = source(max(r0 - 1, 0), min(r1 + 1, height))
            addends = bias + ([residual(r0, r1)] if residual is not None else [])
            if tile:
                out = _winograd_band(inp, u, tile, r0, r1, height, addends)
            else:
                out = _direct_band(inp, weight, r0, r1, height, conv_rows)
                for addend in addends:
                    out = out + addend
            if scale != 1.0:
                out = out / scale
        band_moments = _band_moments(out, groups) if groups else None
        mx.eval(out, band_moments)
        interrupt.checkpoint()
        bands.append(out)
        moments.append(band_moments)
        done_before(r1 - 1)
    return Rows(bands, moments if groups else None)


def _write_rows(source: RowSource, first: int, end: int, dest: np.ndarray) -> None:
    """The source's rows [first, end) into the fp32 numpy view `dest`: by its own writer where it has one (`into`:
    the normalized and activated rows, the upsampled ones), else its MLX rows copied."""
    if hasattr(source, "into"):
        source.into(first, end, dest)
        return
    rows = source(first, end).astype(mx.float32)
    mx.eval(rows)
    dest[...] = np.asarray(rows)


def _input_band(source: RowSource, r0: int, r1: int, height: int, batch: int, width: int, c_in: int,
                pad_columns: bool) -> np.ndarray:
    """The input rows output rows [r0, r1) read, [r0 - 1, r1 + 1), as a new fp32 numpy array, with zero rows beyond
    the image's top and bottom (and a zero column on each side if `pad_columns`), written by the source."""
    first, end = max(r0 - 1, 0), min(r1 + 1, height)
    top, side = int(r0 == 0), int(pad_columns)
    band = cpu_pool.empty((batch, r1 - r0 + 2, width + 2 * side, c_in))
    if side:
        band[:, :, 0] = band[:, :, -1] = 0
    if top:
        band[:, 0] = 0
    if r1 == height:
        band[:, -1] = 0
    _write_rows(source, first, end, band[:, top:top + end - first, side:side + width])
    return band


def _numpy_terms(bias: list, residual, r0: int, r1: int) -> tuple:
    """(bias (C,) or None, residual rows (B, R, W, C) or None) as fp32 numpy views (cpu_pool.as_numpy), and the
    MLX arrays to keep alive while they are read."""
    keep, views = cpu_pool.as_numpy(*bias, *([residual(r0, r1)] if residual is not None else []))
    return (views[0] if bias else None, views[-1] if residual is not None else None, keep)


def _fused_shifted_band(source, taps, bias: list, residual, r0: int, r1: int, height: int, batch: int, width: int,
                        c_in: int, scale: float) -> mx.array:
    """Output rows [r0, r1) by cpu_conv's shifted products, in numpy from end to end: the source writes its rows
    (normalized and activated, or upsampled) straight into the zero-padded input, the output starts as bias +
    residual and the nine products accumulate onto it: one copy back to MLX instead of MLX passes for the pad,
    the bias, the residual and each copy."""
    padded = _input_band(source, r0, r1, height, batch, width, c_in, pad_columns=True)
    out = cpu_pool.empty((batch, r1 - r0, width + 2, taps.shape[2]))
    start = out[:, :, :width]
    b, res, _keep = _numpy_terms(bias, residual, r0, r1)
    terms = [t for t in (b, res) if t is not None]

    def initialize(share):
        for lo, hi in share:
            rows = start[:, lo:hi]
            if not terms:
                rows[...] = 0
            for i, term in enumerate(terms):
                part = term if term.ndim == 1 else term[:, lo:hi]
                np.copyto(rows, part) if i == 0 else np.add(rows, part, out=rows)

    cpu_pool.run(initialize, cpu_pool.row_shares(r1 - r0, max(1, (r1 - r0) // (2 * cpu_pool.workers()))))
    cpu_conv.accumulate_into(padded, taps, out)
    if scale != 1.0:
        start /= np.float32(scale)
    return mx.array(start)


def _fused_winograd_band(source, u: np.ndarray, bias: list, residual, r0: int, r1: int, height: int, batch: int,
                         width: int, c_in: int, scale: float) -> mx.array:
    """Output rows [r0, r1) by cpu_winograd, in numpy from end to end as `_fused_shifted_band` (the input rows
    with their halo, unpadded columns; the bias and residual added as the tiles are put in place)."""
    band = _input_band(source, r0, r1, height, batch, width, c_in, pad_columns=False)
    b, res, _keep = _numpy_terms(bias, residual, r0, r1)
    out = cpu_pool.empty((batch, r1 - r0, width, u.shape[0]))
    cpu_winograd.conv3x3(band, u, out, b, res, halo=True)
    if scale != 1.0:
        out /= np.float32(scale)
    return mx.array(out)


def _winograd_band(inp: mx.array, u: mx.array, tile: int, r0: int, r1: int, height: int,
                   addends: list) -> mx.array:
    """Output rows [r0, r1) from input rows [r0 - 1, r1 + 1) (clipped to the image) by winograd.conv3x3."""
    rows, width = r1 - r0, inp.shape[2]
    extra_rows, extra_cols = -rows % tile, -width % tile  # whole tiles: zero rows/columns, cropped after
    padded = mx.pad(inp.astype(mx.float32),
                    [(0, 0), (int(r0 == 0), int(r1 == height) + extra_rows), (1, 1 + extra_cols), (0, 0)])
    if extra_rows or extra_cols:
        out = winograd.conv3x3(padded, u, tile)[:, :rows, :width]
        for addend in addends:
            out = out + addend
    else:
        out = winograd.conv3x3(padded, u, tile, addends)
    return out.astype(inp.dtype)


def _direct_band(inp: mx.array, weight: mx.array, r0: int, r1: int, height: int, conv_rows: int) -> mx.array:
    """Output rows [r0, r1) by MLX's convolution, in calls whose unfolded input stays cache-sized."""
    first = max(r0 - 1, 0)
    pieces = []
    for s0 in range(r0, r1, conv_rows):
        s1 = min(r1, s0 + conv_rows)
        lo, hi = max(s0 - 1, 0), min(s1 + 1, height)
        padding = ([int(s0 == 0), 1], [int(s1 == height), 1])
        pieces.append(mx.conv_general(inp[:, lo - first:hi - first], weight, padding=padding))
    return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)


def resnet(block, x: Rows, groups: int) -> Rows:
    """A ResnetBlock2D without time embedding; consumes x."""
    h = conv3x3(block.conv1, _norm_act(block.norm1, block.act, x), x.height, groups)
    if "conv_shortcut" in block:
        def residual(first, end):
            return block.conv_shortcut(x.take(first, end))
    else:
        residual = x.take

    def done_before(row):
        h.release_before(row)
        x.release_before(row + 1)  # the residual reads rows from `row + 1` on
    return conv3x3(block.conv2, _norm_act(block.norm2, block.act, h), x.height, groups, residual,
                   block.output_scale_factor, done_before)


def upsample(block, x: Rows, groups: int) -> Rows:
    """Upsample2D (2x nearest, then its 3x3 conv) without making the upsampled image; consumes x."""
    return conv3x3(block.conv, _upsampled(x), 2 * x.height, groups,
                   done_before=lambda row: x.release_before(row // 2))


def mid_block(block, x: Rows, groups: int) -> Rows:
    x = resnet(block.resnets[0], x, groups)
    if "attentions" in block:
        full = x.join()
        b, h, w, c = full.shape
        full = block.attentions[0](full.reshape(b, h * w, c)).reshape(b, h, w, c) + full
        x = Rows.of(full, groups)
    return resnet(block.resnets[1], x, groups)


def downsample(block, x: Rows, groups: int) -> Rows:
    """The VAE's Downsample2D (zero row and column added at the bottom and right, then a stride-2 3x3 conv),
    band by band; consumes x. Output row r reads input rows 2r .. 2r + 2."""
    height, conv = x.height, block.conv
    out_height = (height - 2) // 2 + 1
    probe = x.take(0, 1)
    band_rows = _rows_for(probe.shape[0] * probe.shape[2] * 9 * probe.shape[3] * probe.itemsize, _unfold_bytes())
    bands, moments = [], []
    for o0 in range(0, out_height, band_rows):
        o1 = min(out_height, o0 + band_rows)
        lo, hi = 2 * o0, min(2 * o1 + 1, height)
        inp = mx.pad(x.take(lo, hi), [(0, 0), (0, 2 * o1 + 1 - hi), (0, 1), (0, 0)])
        out = conv(inp)
        band_moments = _band_moments(out, groups)
        mx.eval(out, band_moments)
        bands.append(out)
        moments.append(band_moments)
        x.release_before(2 * o1)
    return Rows(bands, moments)


def _with_cache_limit(fn, *args) -> mx.array:
    previous_limit = mx.set_cache_limit(CACHE_BYTES)
    if previous_limit > CACHE_BYTES:
        mx.set_cache_limit(previous_limit)
    try:
        return fn(*args)
    finally:
        mx.set_cache_limit(previous_limit)


def decode(decoder, z: mx.array) -> mx.array:
    """vae.Decoder's forward pass, band by band: latents (B, h, w, C) -> images (B, H, W, out)."""
    return _with_cache_limit(_decode, decoder, z)


def encode(encoder, x: mx.array) -> mx.array:
    """vae.Encoder's forward pass, band by band: images (B, H, W, C) -> moments (B, h, w, 2 x latent)."""
    return _with_cache_limit(_encode, encoder, x)


def _encode(encoder, x: mx.array) -> mx.array:
    groups = encoder.conv_norm_out.num_groups
    h = conv3x3(encoder.conv_in, Rows([x]).take, x.shape[1], groups)
    for block in encoder.down_blocks:
        for block_resnet in block.resnets:
            h = resnet(block_resnet, h, groups)
        if "downsamplers" in block:
            h = downsample(block.downsamplers[0], h, groups)
    h = mid_block(encoder.mid_block, h, groups)
    out = conv3x3(encoder.conv_out, _norm_act(encoder.conv_norm_out, encoder.conv_act, h), h.height,
                  done_before=h.release_before)
    return out.join()


def _decode(decoder, z: mx.array) -> mx.array:
    groups = decoder.conv_norm_out.num_groups
    latents = Rows([z])
    x = conv3x3(decoder.conv_in, latents.take, z.shape[1], groups)
    x = mid_block(decoder.mid_block, x, groups)
    for block in decoder.up_blocks:
        for block_resnet in block.resnets:
            x = resnet(block_resnet, x, groups)
        if "upsamplers" in block:
            x = upsample(block.upsamplers[0], x, groups)
    out = conv3x3(decoder.conv_out, _norm_act(decoder.conv_norm_out, decoder.conv_act, x), x.height,
                  done_before=x.release_before)
    return out.join()
