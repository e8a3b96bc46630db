"""Attention algorithms: a plain PyTorch reference for each (the readable definition, used on CPU)."""

from hier_lm.ops.chunk_attention import (
    mixed_chunk_attention,
    naive_mixed_chunk_attention,
    relu2_attention,
    relu2_attention_rows,
)
from hier_lm.ops.h_attention import h_attention
from hier_lm.ops.h_attention_cache import HAttentionCache, h_attention_decode
from hier_lm.ops.h_attention_structure import h_attention_level_masks, h_attention_levels, h_attention_num_levels
