"""Tile sizes of the H-attention Triton kernels, picked from the launch target's shared memory per block, and the
check a model runs at construction so that a configuration no GPU can run is refused there, not at the first step.

Imports no Triton: the models call `check_kernel_fits` whether or not Triton is installed.
"""

from __future__ import annotations

from hier_lm.ops.common import construction_budget, pick_config

__all__ = ["BACKWARD_WARPS", "attention_tiles", "check_kernel_fits", "pow2"]

BACKWARD_WARPS = 8

# (query rows, key rows, pipeline stages) per tile, best first. At level 0 a query tile spans several Nr-blocks (the
# dots stay tensor-core sized whatever Nr); at the coarse levels a tile never crosses a block, so at most Nr rows.
_CANDIDATES = ((64, 32, 2), (32, 32, 2), (32, 16, 1), (16, 16, 1))


def pow2(x: int, least: int = 16) -> int:
    """The smallest power of two >= max(x, least): tile dims of `tl.dot` (at least 16)."""
    return max(least, 1 << (max(x, 1) - 1).bit_length())


def _shared_bytes(config: dict, itemsize: int, dim: int, value_dim: int) -> int:
    """An upper bound of one attention kernel's shared memory (bytes): the tile resident in the program (q and dO,
    or k and v), `stages` buffered copies of the streamed tiles, the probability / score tile staged between the
    two dots, and a float32 tile for layout conversions of the scores."""
    rows, cols, stages = config["rows"], config["cols"], config["stages"]
    d, e = pow2(dim), pow2(value_dim)
    big = max(rows, cols)
    operands = big * (d + e) + max(stages, 1) * big * (d + e) + rows * cols
    return itemsize * operands + 4 * rows * cols


def attention_tiles(block_size: int, dim: int, value_dim: int, itemsize: int, fine: bool, budget: int) -> dict:
    """``{"rows", "cols", "stages", "warps"}`` of the level-0 (`fine`) or coarse attention kernels for head dims
    `dim` / `value_dim` and operands of `itemsize` bytes (fp32: 4), within `budget` bytes of shared memory per
    block. Coarse tiles hold at most one Nr-block of rows (rounded up to 16). Against register spills (checked by
    the compile-only test for sm_80 and sm_90): float32 operands take tiles of at most 32 x 32 (exact fp32 dots run
    on FMA units, each thread holding its rows and columns of both operands over the whole reduction, which is the
    streamed tile dim in the dq and dk, dv dots: 64-row tiles spilled up to 4 KB per thread at head dim 64), and
    32 x 16 at head dims above 64, where the kernels run 8 warps and the coarse ones 32-row tiles; the dk, dv
    kernels, which keep four tiles resident, always run 8 warps (`BACKWARD_WARPS`)."""
    wide = max(dim, value_dim) > 64
    candidates = [dict(rows=r, cols=c, stages=s, warps=8 if wide else 4) for r, c, s in _CANDIDATES]
    if not fine:
        cap = pow2(block_size)
        candidates = [dict(c, rows=min(c["rows"], cap), cols=min(c["cols"], cap)) for c in candidates]
    if itemsize >= 4 or (wide and not fine):  # wide coarse: the bidirectional dk, dv kernel inlines two bands
        cols = 16 if wide and itemsize >= 4 else 32
        candidates = [c for c in candidates if c["rows"] <= 32 and c["cols"] <= cols]
    return pick_config(candidates, lambda c: _shared_bytes(c, itemsize, dim, value_dim), budget,
                       what=f"h_attention at head dim {dim}",
                       fix="use a smaller head dim (d_model / n_heads)")


def check_kernel_fits(block_size: int, dim: int, value_dim: int | None = None) -> None:
    """Raise a ValueError when the H-attention kernels cannot run head dim `dim` (value dim `value_dim`) on any
    GPU this machine could launch them on (`construction_budget`), in the widest kernel dtype (float32)."""
    for fine in (True, False):
        attention_tiles(block_size, dim, value_dim or dim, 4, fine, construction_budget())
