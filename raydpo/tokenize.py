"""The one tokenization of a preference pair, with TRL 1.x DPOTrainer's semantics.

- conversational prompts are rendered with `add_generation_prompt=True`, prompt+completion without, each
  with the row's `tools` and `chat_template_kwargs`, and the messages with all their keys;
- standard completions get the EOS token appended when they do not end with it;
- the completion starts where the tokenized prompt and the tokenized prompt+completion diverge;
- `max_prompt_length` (optional) keeps the end of the prompt; then each prompt+completion is cut to
  `max_length` keeping its start, and a pair whose prompt alone fills `max_length` is rejected, since it
  would have no completion token left to learn from.
The token ids are stored in the cache, so training never tokenizes and cannot disagree with the scores.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import jinja2

from raydpo.data import CanonicalPair, RowError
from raydpo.errors import RaydpoError, one_line
from raydpo.hub import model_dir


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


@functools.lru_cache(maxsize=4)
def cached_tokenizer(name_or_path: str, trust_remote_code: bool, fingerprint_digest: str):
    """Load a tokenizer once per Ray worker process (Ray reuses them across tasks and runs).

    The digest of the driver's `tokenizer_fingerprint` is part of the cache key, so a tokenizer whose
    files changed between two runs is loaded again instead of served stale.
    """
    return load_tokenizer(name_or_path, trust_remote_code)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load a tokenizer and check that it can end a completion."""
    from transformers import AutoTokenizer

    directory = model_dir(name_or_path, what="tokenizer", weights=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise RaydpoError(f"could not load tokenizer {name_or_path!r}: {one_line(error)}") from None
    if tokenizer.eos_token is None:
        raise RaydpoError(f"tokenizer {name_or_path!r} has no EOS token; completions need one")
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS (padding is masked either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def tokenize_pair(
    tokenizer,
    pair: CanonicalPair,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
) -> TokenizedPair:
    """Tokenize one canonical pair; raises `RowError` (a reject reason) when it has no learning signal."""
    if pair.conversational:
        if tokenizer.chat_template is None:
            raise RowError("conversational row but the tokenizer has no chat template")
        template_kwargs = {"tools": pair.tools, **pair.chat_template_kwargs}  # as TRL builds them
        prompt_ids = _render(tokenizer, pair.prompt, template_kwargs, add_generation_prompt=True)
        prompt_chosen_ids = _render(tokenizer, pair.prompt + pair.chosen, template_kwargs)
        prompt_rejected_ids = _render(tokenizer, pair.prompt + pair.rejected, template_kwargs)
    else:
        eos = tokenizer.eos_token
        chosen = pair.chosen if pair.chosen.endswith(eos) else pair.chosen + eos
        rejected = pair.rejected if pair.rejected.endswith(eos) else pair.rejected + eos
        prompt_ids, prompt_chosen_ids, prompt_rejected_ids = tokenizer(
            text=[pair.prompt, pair.prompt + chosen, pair.prompt + rejected]
        )["input_ids"]

    prompt_length = min(
        common_prefix_length(prompt_ids, prompt_chosen_ids),
        common_prefix_length(prompt_ids, prompt_rejected_ids),
    )
    chosen_ids = prompt_chosen_ids[prompt_length:]
    rejected_ids = prompt_rejected_ids[prompt_length:]
    prompt_ids = prompt_ids[:prompt_length]
    if not chosen_ids or not rejected_ids:
        raise RowError("a completion has no tokens after tokenization")

    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        truncated = True
    if max_length is not None:
        if len(prompt_ids) >= max_length:
            raise RowError(
                f"prompt fills max_length ({len(prompt_ids)} prompt tokens >= max_length {max_length})"
            )
        room = max_length - len(prompt_ids)
        truncated = truncated or len(chosen_ids) > room or len(rejected_ids) > room
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return TokenizedPair(list(prompt_ids), list(chosen_ids), list(rejected_ids), truncated)


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """Number of leading tokens the two sequences share."""
    length = 0
    for token, other_token in zip(ids, other_ids, strict=False):
        if token != other_token:
            break
        length += 1
    return length


def _render(
    tokenizer,
    messages: list[dict[str, Any]],
    template_kwargs: dict[str, Any],
    add_generation_prompt: bool = False,
) -> list[int]:
    """Token ids of the rendered messages; a conversation the template cannot render is a `RowError`."""
    try:
        result = tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )
    # a template's raise_exception() or syntax (TemplateError); a value it cannot use, such as a list of
    # parts added to a string (TypeError); tools transformers refuses (ValueError)
    except (jinja2.TemplateError, TypeError, ValueError) as error:
        raise RowError(f"chat template refused the conversation: {one_line(error, limit=200)}") from None
    return list(result["input_ids"])


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """What decides the token ids: vocabulary and merges, special tokens, chat template, class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = (
        backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    special = {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())}
    template = (
        tokenizer.chat_template
        if isinstance(tokenizer.chat_template, str)
        else json.dumps(tokenizer.chat_template, sort_keys=True)
    )
    return {
        "class": type(tokenizer).__name__,
        "vocabulary_sha256": hashlib.sha256(vocabulary.encode()).hexdigest(),
        "special_tokens": special,
        "chat_template_sha256": hashlib.sha256((template or "").encode()).hexdigest(),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad_token_id(tokenizer),
    }
