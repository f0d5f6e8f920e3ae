"""Tokenization equals TRL 1.x DPOTrainer's, on the real sample data, for every input format."""

from __future__ import annotations

import json
import types

import pytest
from conftest import to_conversational
from datasets import Dataset
from trl import DPOConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

from raydpo.data import RowError, canonical_pair
from raydpo.layout import pack_pairs
from raydpo.tokenize import pad_token_id, tokenize_pair


def trl_tokenize(tokenizer, rows: list[dict], max_length: int | None = None) -> Dataset:
    """Run TRL's own dataset preparation (prompt extraction, EOS, tokenization, prompt-fill filter)."""
    args = DPOConfig(output_dir="unused", max_length=max_length, report_to=[], use_cpu=True, bf16=False)
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    return DPOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tokenizer, args, "train")


def assert_same_ids(ours, trl_row):
    assert ours.prompt_ids == trl_row["prompt_ids"]
    assert ours.chosen_ids == trl_row["chosen_ids"]
    assert ours.rejected_ids == trl_row["rejected_ids"]


def test_conversational_multi_turn_english_matches_trl(tokenizer, en_rows):
    rows = [to_conversational(r) for r in en_rows[:20]]
    expected = trl_tokenize(tokenizer, rows)
    for row, trl_row in zip(rows, expected, strict=True):
        assert_same_ids(tokenize_pair(tokenizer, canonical_pair(row), max_length=None), trl_row)


def test_sharegpt_chinese_matches_trl_conversational(tokenizer, zh_rows):
    expected = trl_tokenize(tokenizer, [to_conversational(r) for r in zh_rows[:20]])
    for row, trl_row in zip(zh_rows[:20], expected, strict=True):
        assert_same_ids(tokenize_pair(tokenizer, canonical_pair(row), max_length=None), trl_row)


def test_standard_format_appends_eos_like_trl(tokenizer, en_rows):
    rows = [
        {
            "prompt": r["conversations"][-1]["value"],
            "chosen": r["chosen"]["value"],
            "rejected": r["rejected"]["value"],
        }
        for r in en_rows[:10]
    ]
    rows.append({"prompt": "Say hi.", "chosen": "hi" + tokenizer.eos_token, "rejected": "no"})
    expected = trl_tokenize(tokenizer, rows)
    for row, trl_row in zip(rows, expected, strict=True):
        ours = tokenize_pair(tokenizer, canonical_pair(row), max_length=None)
        assert_same_ids(ours, trl_row)
        assert ours.chosen_ids[-1] == tokenizer.eos_token_id


def test_implicit_prompt_matches_trl(tokenizer):
    rows = [
        {"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Rome."},
        {"chosen": "2 + 2 = 4", "rejected": "2 + 2 = 5"},
    ]
    expected = trl_tokenize(tokenizer, rows)
    for row, trl_row in zip(rows, expected, strict=True):
        assert_same_ids(tokenize_pair(tokenizer, canonical_pair(row), max_length=None), trl_row)


def test_truncation_matches_trl_collator(tokenizer, en_rows):
    """keep_start truncation to max_length, as TRL's collator applies it, and TRL's prompt-fill filter."""
    max_length = 256
    rows = [to_conversational(r) for r in en_rows[:24]]
    expected = trl_tokenize(tokenizer, rows, max_length=max_length)
    kept = []
    for row in rows:
        try:
            kept.append(tokenize_pair(tokenizer, canonical_pair(row), max_length=max_length))
        except RowError as error:
            assert "prompt fills max_length" in str(error)
    assert 0 < len(kept) < len(rows)  # the sample has prompts longer than 256 tokens
    assert len(kept) == len(expected)
    collator = DataCollatorForPreference(pad_token_id=pad_token_id(tokenizer), max_length=max_length)
    trl_batch = collator([dict(row) for row in expected])
    ours = pack_pairs(
        [t.prompt_ids for t in kept],
        [t.chosen_ids for t in kept],
        [t.rejected_ids for t in kept],
        pad_token_id(tokenizer),
    )
    width = ours.input_ids.shape[1]
    assert (trl_batch["input_ids"][:, :width] == ours.input_ids).all()
    assert (trl_batch["completion_mask"][:, :width] == ours.completion_mask).all()
    assert trl_batch["completion_mask"][:, width:].sum() == 0
    assert max(len(t.prompt_ids) + len(t.chosen_ids) for t in kept) <= max_length


def test_max_prompt_length_keeps_the_end_of_the_prompt(tokenizer, en_rows):
    pair = canonical_pair(en_rows[1])
    full = tokenize_pair(tokenizer, pair, max_length=None)
    cut = tokenize_pair(tokenizer, pair, max_length=4096, max_prompt_length=32)
    assert cut.prompt_ids == full.prompt_ids[-32:]
    assert cut.truncated and cut.chosen_ids == full.chosen_ids


def test_conversational_row_without_chat_template_is_rejected(tokenizer, en_rows):
    plain = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(RowError, match="no chat template"):
        tokenize_pair(plain, canonical_pair(en_rows[0]))


# ---- what a chat template reads besides role and content ----------------------------------------------

# A ChatML variant that renders everything TRL hands the template: tools, a message's name, tool_call_id,
# reasoning_content and tool_calls, content as a string or as text parts, and a per-row kwarg.
TOOLS_TEMPLATE = (
    "{%- if enable_thinking is defined %}<|im_start|>system{{ '\\n' }}thinking={{ enable_thinking }}"
    "<|im_end|>{{ '\\n' }}{% endif %}"
    "{%- if tools %}<|im_start|>system{{ '\\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}"
    "{% endfor %}<|im_end|>{{ '\\n' }}{% endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}"
    "{% if message.name is defined %} name={{ message.name }}{% endif %}"
    "{% if message.tool_call_id is defined %} id={{ message.tool_call_id }}{% endif %}{{ '\\n' }}"
    "{% if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>{% endif %}"
    "{% if message.content is string %}{{ message.content }}"
    "{% elif message.content is defined %}{% for part in message.content %}{{ part.text }}{% endfor %}"
    "{% endif %}"
    "{% for call in message.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>{{ '\\n' }}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def answer(content, **keys) -> list[dict]:
    return [{"role": "assistant", "content": content, **keys}]


@pytest.fixture(scope="module")
def tools_tokenizer(toy_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy_model)
    tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


@pytest.mark.parametrize(
    "row, shown",
    [
        pytest.param(
            {
                "prompt": [QUESTION],
                "chosen": answer("Sunny."),
                "rejected": answer("Rain."),
                "tools": WEATHER_TOOLS,
            },
            "get_weather",
            id="tools",
        ),
        pytest.param(
            {
                "prompt": [QUESTION],
                "chosen": answer("Sunny."),
                "rejected": answer("Rain."),
                "tools": json.dumps(WEATHER_TOOLS),
            },
            "get_weather",
            id="tools-as-json-string",
        ),
        pytest.param(
            {
                "prompt": [QUESTION],
                "chosen": answer(None, tool_calls=[CALL]),
                "rejected": answer("I cannot tell."),
                "tools": WEATHER_TOOLS,
            },
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
            id="tool-calls-content-none",
        ),
        pytest.param(
            {
                "prompt": [
                    QUESTION,
                    *answer("", tool_calls=[CALL]),
                    {"role": "tool", "name": "get_weather", "tool_call_id": "call-1", "content": "18C, sun"},
                ],
                "chosen": answer("18C and sunny."),
                "rejected": answer("Cold."),
                "tools": WEATHER_TOOLS,
            },
            "<|im_start|>tool name=get_weather id=call-1",
            id="tool-result-name-tool-call-id",
        ),
        pytest.param(
            {
                "prompt": [QUESTION],
                "chosen": answer("Sunny.", reasoning_content="The forecast says sun."),
                "rejected": answer("Snow.", reasoning_content="A guess."),
            },
            "<think>The forecast says sun.</think>",
            id="reasoning-content",
        ),
        pytest.param(
            {
                "prompt": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}],
                    }
                ],
                "chosen": answer([{"type": "text", "text": "4"}]),
                "rejected": answer([{"type": "text", "text": "5"}]),
            },
            "What is 2+2?",
            id="text-parts",
        ),
        pytest.param(
            {
                "prompt": [QUESTION],
                "chosen": answer("Sunny."),
                "rejected": answer("Rain."),
                "chat_template_kwargs": {"enable_thinking": False},
            },
            "thinking=False",
            id="chat-template-kwargs",
        ),
    ],
)
def test_template_inputs_match_trl(tools_tokenizer, row, shown):
    """Tools, chat_template_kwargs and every message key reach the template as TRL passes them; SHOWN,
    a piece only that input renders, is in the ids, so an input both left out would still fail."""
    expected = trl_tokenize(tools_tokenizer, [row])[0]  # one row a dataset: Arrow keeps its own keys
    ours = tokenize_pair(tools_tokenizer, canonical_pair(row), max_length=None)
    assert_same_ids(ours, expected)
    assert shown in tools_tokenizer.decode(ours.prompt_ids + ours.chosen_ids)


def test_a_conversation_the_template_cannot_render_is_a_reject(tokenizer):
    """ChatML adds content to a string: text parts (TypeError) or no content (undefined) cannot render."""
    parts = {"prompt": [QUESTION], "chosen": answer([{"type": "text", "text": "4"}]), "rejected": answer("5")}
    calls = {"prompt": [QUESTION], "chosen": answer(None, tool_calls=[CALL]), "rejected": answer("5")}
    for row in (parts, calls):
        with pytest.raises(RowError, match="chat template refused the conversation"):
            tokenize_pair(tokenizer, canonical_pair(row))
