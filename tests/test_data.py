"""Input formats -> canonical pairs, pair ids and reject reasons."""

from __future__ import annotations

import pytest
from conftest import to_conversational
from trl.data_utils import extract_prompt as trl_extract_prompt

from raydpo.data import RowError, canonical_pair, extract_prompt


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
    from raydpo.data import is_hub_id

    assert is_hub_id(source) is hub
