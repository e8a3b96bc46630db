"""Attention operators, one package each (`h_attention/`, `chunk_attention/`): a public function with its checks
and the dispatch between a plain PyTorch reference (`reference.py`, the readable definition, used on CPU) and
Triton kernels (`triton.py`, used on CUDA), `attn_impl="auto" | "torch" | "triton"` (`common.py`)."""

from hier_lm.ops.chunk_attention import (
    mixed_chunk_attention,
    naive_mixed_chunk_attention,
    relu2_attention,
    relu2_attention_rows,
)
from hier_lm.ops.common import IMPLS
from hier_lm.ops.h_attention import (
    VALUE_COARSENINGS,
    HAttentionCache,
    check_block_size,
    h_attention,
    h_attention_decode,
    h_attention_level_masks,
    h_attention_levels,
    h_attention_num_levels,
)

__all__ = ["IMPLS", "VALUE_COARSENINGS", "HAttentionCache", "check_block_size", "h_attention", "h_attention_decode",
           "h_attention_level_masks", "h_attention_levels", "h_attention_num_levels", "mixed_chunk_attention",
           "naive_mixed_chunk_attention", "relu2_attention", "relu2_attention_rows"]
