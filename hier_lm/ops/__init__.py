"""Attention operators: each a public function with its checks and the dispatch between a plain PyTorch
reference (the readable definition, used on CPU) and Triton kernels (used on CUDA), `attn_impl="auto" | "torch" |
"triton"`."""

from hier_lm.ops.chunk_attention import (
    mixed_chunk_attention,
    naive_mixed_chunk_attention,
    relu2_attention,
    relu2_attention_rows,
)
from hier_lm.ops.dispatch import IMPLS
from hier_lm.ops.h_attention import VALUE_COARSENINGS, check_block_size, h_attention
from hier_lm.ops.h_attention_cache import HAttentionCache, h_attention_decode
from hier_lm.ops.h_attention_structure import h_attention_level_masks, h_attention_levels, h_attention_num_levels

__all__ = ["IMPLS", "VALUE_COARSENINGS", "HAttentionCache", "check_block_size", "h_attention", "h_attention_decode",
           "h_attention_level_masks", "h_attention_levels", "h_attention_num_levels", "mixed_chunk_attention",
           "naive_mixed_chunk_attention", "relu2_attention", "relu2_attention_rows"]
