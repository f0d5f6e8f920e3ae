"""Attention over shared-prefix rows (`prompt | chosen | rejected`), a segment at a time.

A dense 4D mask over the whole row makes SDPA compute every query against every key: (P+C+R)^2 per
row, more than the two separate causal sequences cost ((P+C)^2/2 + (P+R)^2/2), which is why a
masked shared row can be slower than two rows although it has fewer tokens. Here each row is split
into its segments and each segment attends to exactly the keys it may see:

- prompt queries: the prompt's keys, causal (SDPA skips the upper triangle);
- chosen queries: the prompt's and the chosen keys, causal aligned to the last key;
- rejected queries: the prompt's and the rejected keys (never the chosen ones), likewise.

Queries of a branch go in blocks of `QUERY_BLOCK`, each against the keys up to its last query, so
only a block-wide strip of masked keys is computed beyond the causal triangle. The cost is the
unshared attention minus the prompt's repeat: P^2/2 + C(P + C/2) + R(P + R/2). Padding is skipped.

The function is registered with transformers' `AttentionInterface` as `ATTENTION_NAME`; given no
`prefix_segments`, it is transformers' own SDPA, so the model keeps scoring two-row batches as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_NAME = "raydpo_prefix_sdpa"
QUERY_BLOCK = 128


def register() -> None:
    """Make `ATTENTION_NAME` known to transformers (idempotent): the attention and SDPA's mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, prefix_sdpa_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def prefix_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    prefix_segments: tuple[tuple[int, int, int], ...] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D].

    `prefix_segments` holds each row's (prompt, chosen, rejected) lengths; without it this is SDPA."""
    if prefix_segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    width = query.shape[2]
    rows = []
    for row, (prompt, chosen, rejected) in enumerate(prefix_segments):
        q, k, v = query[row], key[row], value[row]  # [H, T, D]
        pieces = []
        if prompt:
            pieces.append(_causal(q[:, :prompt], k[:, :prompt], v[:, :prompt], dropout, scaling))
        for start, length in ((prompt, chosen), (prompt + chosen, rejected)):
            if not length:
                continue
            end = start + length
            if start == prompt:
                keys, values = k[:, :end], v[:, :end]
            else:
                keys = torch.cat((k[:, :prompt], k[:, start:end]), dim=1)
                values = torch.cat((v[:, :prompt], v[:, start:end]), dim=1)
            pieces.append(_causal(q[:, start:end], keys, values, dropout, scaling))
        used = prompt + chosen + rejected
        if used < width:
            pieces.append(q.new_zeros(q.shape[0], width - used, value.shape[-1]))
        rows.append(torch.cat(pieces, dim=1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def _causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scaling: float | None
) -> torch.Tensor:
    """Attention of Q queries over K >= Q keys, query i seeing keys 0 .. K - Q + i (causal, aligned to the
    last key), a block of queries at a time so that masked keys beyond the diagonal stay a strip."""
    queries, keys = query.shape[1], key.shape[1]
    if queries == keys:
        return F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=True, scale=scaling
        )
    offset = keys - queries
    blocks = []
    for start in range(0, queries, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, queries)
        visible = offset + end  # keys the block's last query sees
        allowed = torch.arange(visible, device=query.device)[None, :] <= (
            offset + torch.arange(start, end, device=query.device)[:, None]
        )
        blocks.append(
            F.scaled_dot_product_attention(
                query[:, start:end],
                key[:, :visible],
                value[:, :visible],
                attn_mask=allowed,
                dropout_p=dropout,
                scale=scaling,
            )
        )
    return torch.cat(blocks, dim=1)
