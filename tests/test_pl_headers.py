"""X-PL-* header parsing: valid parts kept, each malformed part named in a warning."""

from __future__ import annotations

import pytest

from plproxy.pl_headers import MAX_TAGS, parse_pl_headers


def parse(**headers: str):  # type: ignore[no-untyped-def]
    return parse_pl_headers([(name.replace("_", "-"), value) for name, value in headers.items()])


@pytest.mark.parametrize(
    ("value", "tags"),
    [
        ("a, b", ("a", "b")),
        ("a,,b , a", ("a", "b")),
        ('["x", "y z"]', ("x", "y z")),
        ("[]", ()),
        ("single", ("single",)),
    ],
)
def test_tags_in_both_forms(value: str, tags: tuple[str, ...]) -> None:
    parsed = parse(X_PL_Tags=value)
    assert parsed.annotations.tags == tags
    assert parsed.warnings == ()


@pytest.mark.parametrize(
    ("value", "warning"),
    [
        ("[not json", "X-PL-Tags: starts with '[' but is not a JSON array"),
        ('["ok", 3]', "X-PL-Tags: items that are not strings were ignored"),
        ("x" * 600, "longer than 512"),
        (",".join(f"t{i}" for i in range(MAX_TAGS + 5)), f"more than {MAX_TAGS} tags"),
    ],
)
def test_malformed_tags_warn(value: str, warning: str) -> None:
    parsed = parse(X_PL_Tags=value)
    assert any(warning in w for w in parsed.warnings)
    assert len(parsed.annotations.tags) <= MAX_TAGS


def test_metadata_values_become_strings() -> None:
    parsed = parse(X_PL_Metadata='{"a": "b", "n": 3, "o": {"k": [1]}, "t": true}')
    assert parsed.annotations.metadata == {"a": "b", "n": "3", "o": '{"k":[1]}', "t": "true"}
    assert parsed.warnings == ()


@pytest.mark.parametrize("value", ["[1]", "not json", '"s"'])
def test_metadata_not_an_object(value: str) -> None:
    parsed = parse(X_PL_Metadata=value)
    assert parsed.annotations.metadata == {}
    assert parsed.warnings
    assert parsed.warnings[0].startswith("X-PL-Metadata:")


def test_prompt_link() -> None:
    parsed = parse(
        X_PL_Prompt_Name="example",
        X_PL_Prompt_Version="3",
        X_PL_Prompt_Input_Variables='{"product": "toasters"}',
    )
    notes = parsed.annotations
    assert (notes.prompt_name, notes.prompt_version_number, notes.prompt_label) == ("example", 3, None)
    assert notes.prompt_input_variables == {"product": "toasters"}
    assert parsed.warnings == ()


def test_prompt_label_and_version_together_keep_the_version() -> None:
    parsed = parse(X_PL_Prompt_Name="p", X_PL_Prompt_Version="2", X_PL_Prompt_Label="prod")
    assert parsed.annotations.prompt_version_number == 2
    assert parsed.annotations.prompt_label is None
    assert parsed.warnings == ("X-PL-Prompt-Label: X-PL-Prompt-Version is also set; the label was ignored",)


def test_prompt_parts_without_name_warn() -> None:
    parsed = parse(X_PL_Prompt_Version="2")
    assert parsed.annotations.prompt_name is None
    assert parsed.warnings == ("X-PL-Prompt-Version: needs X-PL-Prompt-Name; ignored",)


@pytest.mark.parametrize(("value", "score"), [("0", 0), ("100", 100), ("42", 42)])
def test_score(value: str, score: int) -> None:
    assert parse(X_PL_Score=value).annotations.score == score


@pytest.mark.parametrize("value", ["101", "-1", "4.5", "high", ""])
def test_bad_score(value: str) -> None:
    parsed = parse(X_PL_Score=value)
    assert parsed.annotations.score is None
    assert parsed.warnings == ("X-PL-Score: is not a whole number from 0 to 100; ignored",)


@pytest.mark.parametrize(("value", "enabled"), [("off", False), ("FALSE", False), ("0", False), ("on", True)])
def test_log_switch(value: str, enabled: bool) -> None:
    assert parse(X_PL_Log=value).log_enabled is enabled


def test_group_id() -> None:
    assert parse(X_PL_Group_Id="17").annotations.group_id == 17
    assert parse(X_PL_Group_Id="x").warnings[0].startswith("X-PL-Group-Id:")


def test_api_key_with_control_characters_is_refused_and_not_echoed() -> None:
    parsed = parse(X_PL_Api_Key="pl_abc\x07def")
    assert parsed.api_key is None
    assert "pl_abc" not in " ".join(parsed.warnings)
    assert parse(X_PL_Api_Key="pl_workspace_b").api_key == "pl_workspace_b"


def test_unknown_header_warns_without_echoing_value() -> None:
    parsed = parse(X_PL_Anything="secret-value")
    assert parsed.warnings == ("X-PL-Anything: unknown X-PL- header; it was removed and ignored",)


def test_warnings_never_contain_line_breaks() -> None:
    parsed = parse(X_PL_Metadata="{\r\nX-Evil: 1", X_PL_Tags="[\r\n", X_PL_Score="1\r\n2")
    assert parsed.warnings
    assert all("\r" not in w and "\n" not in w for w in parsed.warnings)


def test_other_headers_are_not_parsed() -> None:
    parsed = parse_pl_headers([("Authorization", "Bearer sk-x"), ("Content-Type", "application/json")])
    assert parsed.warnings == ()
    assert parsed.annotations.tags == ()
