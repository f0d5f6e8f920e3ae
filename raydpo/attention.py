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
A packed row (every pair of the batch end to end) costs the sum of its pairs' attention, not the
square of its length, so packing removes the padding of the other layers at no cost here.

On a GPU in 16 bits the same attention is one variable-length flash call per layer for the whole
batch (`torch.nn.attention.varlen`): each row is two sequences, `prompt | chosen` over its own keys
and `rejected` over the prompt's and its own keys, causal aligned to the last key; the prompt's keys
are gathered twice, its queries computed once. `VarlenPlan` holds the gathers, built once per batch.

The function is registered with transformers' `AttentionInterface` as `ATTENTION_NAME`; given no
`prefix_segments`, it is transformers' own SDPA, so the model keeps scoring two-row batches as before.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "raydpo_prefix_sdpa"
QUERY_BLOCK = 128
USE_VARLEN = True  # the variable-length flash kernel where it runs (CUDA, 16-bit); else segment-wise SDPA


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
    prefix_segments: tuple[tuple[int, int, int, int, int], ...] | None = None,
    prefix_plan: VarlenPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D].

    `prefix_segments` holds each pair's (row, start, prompt, chosen, rejected), in row and position
    order (`SharedPairs.segment_lengths`); without it this is SDPA. With a `prefix_plan` (and no
    dropout, which the flash call does not take) it is one varlen call."""
    if prefix_segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if prefix_plan is not None and not (dropout and module.training):
        return _varlen_forward(query, key, value, prefix_plan, scaling), None
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    width = query.shape[2]
    pieces: list[list[torch.Tensor]] = [[] for _ in range(query.shape[0])]
    for row, start, prompt, chosen, rejected in prefix_segments:
        q, k, v = query[row], key[row], value[row]  # [H, T, D]
        branch = start + prompt  # the chosen branch starts here, the rejected one after it
        if prompt:
            pieces[row].append(
                _causal(q[:, start:branch], k[:, start:branch], v[:, start:branch], dropout, scaling)
            )
        for first, length in ((branch, chosen), (branch + chosen, rejected)):
            if not length:
                continue
            end = first + length
            if first == branch:
                keys, values = k[:, start:end], v[:, start:end]
            else:
                keys = torch.cat((k[:, start:branch], k[:, first:end]), dim=1)
                values = torch.cat((v[:, start:branch], v[:, first:end]), dim=1)
            pieces[row].append(_causal(q[:, first:end], keys, values, dropout, scaling))
    rows = []
    for row_pieces in pieces:
        used = sum(piece.shape[1] for piece in row_pieces)
        if used < width:
            row_pieces.append(query.new_zeros(query.shape[1], width - used, value.shape[-1]))
        rows.append(torch.cat(row_pieces, dim=1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def _causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scaling: float | None
) -> torch.Tensor:
    """Attention of Q queries over K >= Q keys ([H, Q, D] over [H, K, D]), query i seeing keys
    0 .. K - Q + i (causal, aligned to the last key), a block of queries at a time so that masked keys
    beyond the diagonal stay a strip. SDPA's fused kernels take 4-D tensors only (3-D ones go to its
    math kernel: 4.5x slower for a 1024-token prompt on CPU), hence the batch dimension of one."""
    query, key, value = query[None], key[None], value[None]
    queries, keys = query.shape[2], key.shape[2]
    if queries == keys:
        return F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=True, scale=scaling
        )[0]
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
                query[:, :, start:end],
                key[:, :, :visible],
                value[:, :, :visible],
                attn_mask=allowed,
                dropout_p=dropout,
                scale=scaling,
            )[0]
        )
    return torch.cat(blocks, dim=1)


@dataclass(frozen=True)
class VarlenPlan:
    """Where a batch of shared rows' queries and keys go in one variable-length attention call.

    Row `b`, position `t` of the batch is flat index `b * width + t`. Queries are the rows' positions
    in order, padding left out; each row gives the sequences `prompt | chosen` (keys: the same
    positions) and `rejected` (keys: the prompt's positions, then its own)."""

    query_index: torch.Tensor  # [Nq] flat positions of the queries, in row order
    key_index: torch.Tensor  # [Nk] flat positions of each sequence's keys
    cu_query: torch.Tensor  # [S + 1] int32, sequence starts in the queries
    cu_key: torch.Tensor  # [S + 1] int32, sequence starts in the keys
    max_query: int
    max_key: int


def use_varlen(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether shared rows on `device` in `dtype` go through the variable-length flash kernel."""
    return (
        USE_VARLEN
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and importlib.util.find_spec("torch.nn.attention.varlen") is not None  # torch >= 2.10
    )


def varlen_plan(
    prefix_segments: tuple[tuple[int, int, int, int, int], ...], width: int, device
) -> VarlenPlan:
    query_index, key_index, query_lengths, key_lengths = [], [], [], []
    for row, start, prompt, chosen, rejected in prefix_segments:
        start += row * width
        query_index.append(torch.arange(start, start + prompt + chosen + rejected))
        key_index.append(torch.arange(start, start + prompt + chosen))
        query_lengths.append(prompt + chosen)
        key_lengths.append(prompt + chosen)
        if rejected:
            branch = start + prompt + chosen
            key_index += [torch.arange(start, start + prompt), torch.arange(branch, branch + rejected)]
            query_lengths.append(rejected)
            key_lengths.append(prompt + rejected)

    def starts(lengths: list[int]) -> torch.Tensor:
        return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)

    return VarlenPlan(
        query_index=torch.cat(query_index).to(device),
        key_index=torch.cat(key_index).to(device),
        cu_query=starts(query_lengths),
        cu_key=starts(key_lengths),
        max_query=max(query_lengths),
        max_key=max(key_lengths),
    )


def _varlen_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: VarlenPlan, scaling: float | None
) -> torch.Tensor:
    batch, heads, width, _ = query.shape

    def flat(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # [B, H, T, D] -> [N, H, D]
        return states.transpose(1, 2).reshape(batch * width, states.shape[1], -1)[index]

    out = _varlen_kernel(
        flat(query, plan.query_index),
        flat(key, plan.key_index),
        flat(value, plan.key_index),
        plan,
        scaling,
    )
    rows = out.new_zeros(batch * width, heads, value.shape[-1]).index_copy(0, plan.query_index, out)
    return rows.view(batch, width, heads, value.shape[-1])


def _varlen_kernel(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: VarlenPlan, scaling: float | None
) -> torch.Tensor:
    """Causal attention of each sequence's queries over its keys, aligned to the last key (flash's
    convention when a sequence has fewer queries than keys): [Nq, H, D] -> [Nq, H, D]."""
    from torch.nn.attention.varlen import varlen_attn

    accepted = _varlen_parameters()
    options: dict = {"scale": scaling}
    if "window_size" in accepted:
        options["window_size"] = (-1, 0)
    else:  # flash's causal mask is aligned to the last key, as the window above says
        options["is_causal"] = True
    if query.shape[1] != key.shape[1]:
        if "enable_gqa" in accepted:
            options["enable_gqa"] = True
        else:  # torch < 2.12: one key/value head per query head
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return varlen_attn(query, key, value, plan.cu_query, plan.cu_key, plan.max_query, plan.max_key, **options)


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    """The keywords of this torch's `varlen_attn`: `enable_gqa` and `window_size` came after 2.10."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)
