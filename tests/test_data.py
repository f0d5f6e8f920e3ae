"""Input formats -> canonical pairs, pair ids and reject reasons."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import to_conversational, write_jsonl
from trl.data_utils import extract_prompt as trl_extract_prompt

from raydpo.data import RowError, canonical_pair, extract_prompt, parse_row
from raydpo.sources import SOURCE_ROW, open_source


def test_sharegpt_row_maps_roles_and_keeps_system_prompt(en_rows):
    row = next(r for r in en_rows if any(t["from"] == "system" for t in r["conversations"]))
    pair = canonical_pair(row)
    assert pair.conversational
    assert pair.prompt == to_conversational(row)["prompt"]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    assert [message["role"] for message in pair.prompt] == [roles[t["from"]] for t in row["conversations"]]
    assert pair.chosen == [{"role": "assistant", "content": row["chosen"]["value"]}]
    assert pair.rejected == [{"role": "assistant", "content": row["rejected"]["value"]}]


def test_system_column_is_prepended():
    row = {
        "conversations": [{"from": "human", "value": "hi"}],
        "system": "be brief",
        "chosen": {"from": "gpt", "value": "hello"},
        "rejected": {"from": "gpt", "value": "go away"},
    }
    assert canonical_pair(row).prompt[0] == {"role": "system", "content": "be brief"}


def test_conversational_and_sharegpt_forms_give_the_same_pair_id(en_rows):
    row = en_rows[3]
    assert canonical_pair(row).pair_id == canonical_pair(to_conversational(row)).pair_id


def test_standard_row():
    pair = canonical_pair({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."})
    assert not pair.conversational
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The sky is", " blue.", " green.")


@pytest.mark.parametrize(
    "chosen, rejected",
    [
        ("The sky is blue.", "The sky is green."),
        ("Where is the sun? In the sky.", "Where is the sun? In the sea."),
        ("same start then a", "same start then b"),
    ],
)
def test_implicit_prompt_matches_trl(chosen, rejected):
    expected = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
    assert extract_prompt(chosen, rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])
    pair = canonical_pair({"chosen": chosen, "rejected": rejected})
    assert pair.prompt == expected["prompt"]


def test_implicit_conversational_prompt_matches_trl():
    user = {"role": "user", "content": "What color is the sky?"}
    chosen = [user, {"role": "assistant", "content": "It is blue."}]
    rejected = [user, {"role": "assistant", "content": "It is green."}]
    expected = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
    pair = canonical_pair({"chosen": chosen, "rejected": rejected})
    assert (pair.prompt, pair.chosen, pair.rejected) == (
        expected["prompt"],
        expected["chosen"],
        expected["rejected"],
    )


def test_id_column_is_used_and_content_hash_is_stable():
    row = {"id": 7, "prompt": "p", "chosen": "a", "rejected": "b"}
    assert canonical_pair(row, "id").pair_id == "7"
    assert canonical_pair(dict(row)).pair_id == canonical_pair(dict(row)).pair_id
    assert canonical_pair(row).pair_id != canonical_pair({**row, "chosen": "c"}).pair_id


CHAT = {
    "prompt": [{"role": "user", "content": "What is the weather in Paris?"}],
    "chosen": [{"role": "assistant", "content": "Sunny."}],
    "rejected": [{"role": "assistant", "content": "Rain."}],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def test_messages_keep_every_key_but_nulls():
    """Keys the template reads stay; null ones go, as transformers drops them before rendering."""
    chosen = [{"role": "assistant", "content": None, "tool_calls": [CALL], "name": None}]
    rejected = [
        {"role": "assistant", "content": "Rain.", "reasoning_content": "A guess.", "tool_calls": None}
    ]
    pair = canonical_pair({**CHAT, "chosen": chosen, "rejected": rejected})
    assert pair.chosen == [{"role": "assistant", "tool_calls": [CALL]}]
    assert pair.rejected == [{"role": "assistant", "content": "Rain.", "reasoning_content": "A guess."}]


def test_tools_and_template_kwargs_are_kept_for_conversations_only():
    pair = canonical_pair({**CHAT, "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}})
    assert pair.tools == TOOLS and pair.chat_template_kwargs == {"enable_thinking": False}
    assert canonical_pair({**CHAT, "tools": json.dumps(TOOLS)}).tools == TOOLS  # a JSON string, as TRL parses
    assert canonical_pair({**CHAT, "chat_template_kwargs": None}).chat_template_kwargs == {}
    text = canonical_pair({"prompt": "p", "chosen": "a", "rejected": "b", "tools": TOOLS})
    assert (text.tools, text.chat_template_kwargs) == (None, {})  # TRL renders no template for text


def test_a_tool_call_or_a_reasoning_is_not_an_empty_completion():
    for chosen in (
        [{"role": "assistant", "content": None, "tool_calls": [CALL]}],
        [{"role": "assistant", "content": "", "reasoning_content": "Think."}],
    ):
        assert canonical_pair({**CHAT, "chosen": chosen}).chosen == [
            {key: value for key, value in chosen[0].items() if value is not None}
        ]


def test_pair_id_covers_tools_kwargs_and_message_keys():
    ids = {
        canonical_pair(row).pair_id
        for row in (
            CHAT,
            {**CHAT, "tools": TOOLS},
            {**CHAT, "tools": []},
            {**CHAT, "chat_template_kwargs": {"enable_thinking": False}},
            {**CHAT, "chat_template_kwargs": {"enable_thinking": True}},
            {**CHAT, "chosen": [{**CHAT["chosen"][0], "reasoning_content": "Think."}]},
            {**CHAT, "chosen": [{**CHAT["chosen"][0], "name": "bot"}]},
        )
    }
    assert len(ids) == 7
    same = {
        canonical_pair(row).pair_id
        for row in (
            {**CHAT, "tools": TOOLS},
            {**CHAT, "tools": json.dumps(TOOLS)},
            {**CHAT, "tools": TOOLS, "chat_template_kwargs": None},
            {**CHAT, "tools": TOOLS, "chosen": [{**CHAT["chosen"][0], "name": None}]},  # Arrow's null key
        )
    }
    assert len(same) == 1


def test_rows_without_tools_keep_their_earlier_content_hash():
    """The hash of [prompt, chosen, rejected] that ids were before tools were read: caches stay valid."""
    before = json.dumps(
        [CHAT["prompt"], CHAT["chosen"], CHAT["rejected"]], sort_keys=True, ensure_ascii=False
    )
    expected = hashlib.sha256(before.encode()).hexdigest()[:32]
    assert (
        canonical_pair(CHAT).pair_id
        == canonical_pair({**CHAT, "chat_template_kwargs": {}}).pair_id
        == expected
    )


# Rows whose messages differ in their keys: in Parquet, a Hugging Face or a Ray dataset, Arrow gives each
# message and row the keys of all of them, as nulls. Tools are JSON strings, each row's as it is.
ARROW_ROWS = [
    {**CHAT, "tools": json.dumps(TOOLS), "chat_template_kwargs": {"enable_thinking": False}},
    {
        **CHAT,
        "chosen": [{"role": "assistant", "content": None, "tool_calls": [CALL]}],
        "tools": json.dumps(TOOLS),
    },
    {
        "prompt": [
            *CHAT["prompt"],
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "name": "get_weather", "tool_call_id": "call-1", "content": "18C, sun"},
        ],
        "chosen": [{"role": "assistant", "content": "Sunny.", "reasoning_content": "It says sun."}],
        "rejected": CHAT["rejected"],
    },
    CHAT,
]


def test_every_source_gives_the_same_pairs(ray_session, tmp_path):
    """JSONL, Parquet, a saved Hugging Face dataset and a Ray dataset: the rows as the pipeline reads
    them (Arrow batches to Python) become the pairs the rows themselves make, ids included."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    expected = [canonical_pair(row) for row in ARROW_ROWS]
    pq.write_table(pa.Table.from_pylist(ARROW_ROWS), tmp_path / "rows.parquet")
    datasets.Dataset.from_list(ARROW_ROWS).save_to_disk(str(tmp_path / "saved"))
    sources = {
        "jsonl": str(write_jsonl(tmp_path / "rows.jsonl", ARROW_ROWS)),
        "parquet": str(tmp_path / "rows.parquet"),
        "huggingface": str(tmp_path / "saved"),
        "ray": ray.data.from_items(ARROW_ROWS),
    }
    for kind, source in sources.items():
        dataset, _ = open_source(source)
        rows = [row for batch in dataset.iter_batches(batch_format="pyarrow") for row in batch.to_pylist()]
        rows.sort(key=lambda row: row.pop(SOURCE_ROW))
        assert [canonical_pair(parse_row(row)) for row in rows] == expected, kind


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "p", "rejected": "b"}, "missing chosen"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen is neither a string nor a list"),
        ({"prompt": "p", "chosen": "   ", "rejected": "b"}, "empty chosen"),
        ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "mix text"),
        ({"prompt": [{"role": "user"}], "chosen": [], "rejected": []}, "content is not a string"),
        ({"prompt": [{"role": "wizard", "content": "x"}], "chosen": [], "rejected": []}, "unknown role"),
        (
            {"prompt": [{"role": "user", "content": 1}], "chosen": [], "rejected": []},
            "content is not a string",
        ),
        (
            {
                "conversations": [{"from": "alien", "value": "x"}],
                "chosen": {"from": "gpt", "value": "a"},
                "rejected": {"from": "gpt", "value": "b"},
            },
            "unknown 'from'",
        ),
        (
            {
                "conversations": "text",
                "chosen": {"from": "gpt", "value": "a"},
                "rejected": {"from": "gpt", "value": "b"},
            },
            "not a non-empty list",
        ),
        (
            {
                "prompt": [],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "empty prompt",
        ),
        ({**CHAT, "chosen": [{"role": "assistant", "content": None}]}, "content is not a string"),
        ({**CHAT, "chosen": [{"role": "assistant", "content": []}]}, "content is not a string"),
        ({**CHAT, "chosen": [{"role": "assistant", "content": [{"text": "a"}]}]}, "content is not a string"),
        (
            {**CHAT, "chosen": [{"role": "assistant", "content": [{"type": "text", "text": " "}]}]},
            "empty chosen",
        ),
        (
            {
                **CHAT,
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
            },
            "content part of type 'image'; raydpo takes text parts only",
        ),
        ({**CHAT, "images": ["cat.png"]}, "the row has images"),
        ({**CHAT, "tools": {"name": "f"}}, "tools is not a list of tool schemas"),
        ({**CHAT, "tools": "[{"}, "tools is a string but not valid JSON"),
        ({**CHAT, "chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs is not a mapping"),
        ({**CHAT, "chat_template_kwargs": {"tokenize": False}}, "sets 'tokenize', which tokenization sets"),
        ({**CHAT, "chosen": [{"role": "assistant", "content": "a", "extra": b"\x00"}]}, "not JSON"),
    ],
)
def test_bad_rows_raise_a_reason(row, reason):
    with pytest.raises(RowError, match=reason):
        canonical_pair(row)


def test_missing_id_value_is_a_reject():
    with pytest.raises(RowError, match="id column"):
        canonical_pair({"prompt": "p", "chosen": "a", "rejected": "b"}, id_column="id")


@pytest.mark.parametrize(
    "source, hub",
    [
        ("org/name-2.5-data", True),
        ("trl-lib/ultrafeedback_binarized", True),
        ("imdb", True),
        ("HuggingFaceH4/ultrafeedback_binarized", True),
        ("data/prefs.jsonl", False),
        ("prefs.json", False),
        ("org/name.parquet", False),
        ("./data", False),
        ("/abs/data", False),
        ("~/data", False),
        ("a/b/c", False),
        ("s3://bucket/prefs", False),
        ("org/../etc", False),
    ],
)
def test_missing_source_is_a_hub_id_or_a_missing_path(source, hub):
    """A source that is not on disk is a hub dataset id (dots allowed) or a path that does not exist."""
    from raydpo.sources import is_hub_id

    assert is_hub_id(source) is hub
