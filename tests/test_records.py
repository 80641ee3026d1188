"""Dataset records: every accepted format and every refusal, as one table of cases.

A refusal must be a sentence that names the line where there is one, so each refusal case lists
the fragments its message must contain.
"""

from __future__ import annotations

import json

import pytest

from nomoat.records import MAX_LINE_BYTES, DatasetError, parse_dataset, record_text


def jsonl(*records: object) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


ACCEPTED = [
    pytest.param(jsonl({"text": "one"}, {"text": "two"}), "d.jsonl", ["one", "two"], id="text"),
    pytest.param(
        jsonl({"prompt": "Q: why? ", "completion": "A: because."}), "d.jsonl", ["Q: why? A: because."],
        id="prompt-completion",
    ),
    pytest.param(
        jsonl({"messages": [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "hi", "name": "ann"},
                            {"role": "assistant", "content": "hello"}]}),
        "d.jsonl", ["system: be brief\nuser: hi\nassistant: hello"], id="messages",
    ),
    pytest.param(
        jsonl({"text": "a"}, {"prompt": "p", "completion": "c"},
              {"messages": [{"role": "user", "content": "m"}]}),
        "d.jsonl", ["a", "pc", "user: m"], id="mixed-formats",
    ),
    pytest.param(b'\n{"text": "a"}\n\n   \n{"text": "b"}', "d.jsonl", ["a", "b"],
                 id="blank-lines-and-no-final-newline"),
    pytest.param(b'{"text": "a"}\r\n{"text": "b"}\r\n', "d.jsonl", ["a", "b"], id="crlf"),
    pytest.param(jsonl({"text": "naïve café ☕ \u2028 line sep"}), "d.jsonl",
                 ["naïve café ☕ \u2028 line sep"], id="unicode"),
    pytest.param(jsonl({"text": "keeps\nnewlines", "meta": 1}), "D.JSONL", ["keeps\nnewlines"],
                 id="upper-case-extension-extra-fields"),
    pytest.param(b"first para\nsecond line\n\n\nsecond para\n\n", "notes.txt",
                 ["first para\nsecond line", "second para"], id="txt-paragraphs"),
    pytest.param(b"only one paragraph", "notes.txt", ["only one paragraph"], id="txt-single"),
    pytest.param(b'\xef\xbb\xbf{"text": "bom"}\n', "d.jsonl", ["bom"], id="utf8-bom-jsonl"),
    pytest.param(b"\xef\xbb\xbfbom para\n", "d.txt", ["bom para"], id="utf8-bom-txt"),
]


@pytest.mark.parametrize(("data", "filename", "expected"), ACCEPTED)
def test_accepted(data: bytes, filename: str, expected: list[str]) -> None:
    assert parse_dataset(data, filename) == expected


LONG = "x" * 200
REFUSED = [
    # (data, filename, fragments the message must contain)
    pytest.param(jsonl({"text": "a"}, {"text": "b"}) + b'{"text": "c"\n', "d.jsonl",
                 ["line 3", "not valid JSON"], id="malformed-json"),
    pytest.param(b'{"text": "a"}\n[1, 2]\n', "d.jsonl", ["line 2", "JSON object", "list"],
                 id="not-an-object"),
    pytest.param(b'"just a string"\n', "d.jsonl", ["line 1", "JSON object", "str"], id="bare-string"),
    pytest.param(jsonl({"text": "a"}, {"body": "b", "id": 3}), "d.jsonl",
                 ["line 2", "'text'", "'messages'", "(it has: body, id)"], id="missing-fields"),
    pytest.param(jsonl({}), "d.jsonl", ["line 1", "(it has: none)"], id="empty-object"),
    pytest.param(jsonl({"text": "a"}, {"text": 5}), "d.jsonl", ["line 2", "'text' must be a string", "int"],
                 id="text-not-string"),
    pytest.param(jsonl({"text": None}), "d.jsonl", ["line 1", "'text' must be a string", "NoneType"],
                 id="text-null"),
    pytest.param(jsonl({"prompt": "p"}), "d.jsonl", ["line 1", "needs 'completion'"], id="prompt-only"),
    pytest.param(jsonl({"completion": "c"}), "d.jsonl", ["line 1", "needs 'completion'"],
                 id="completion-only"),
    pytest.param(jsonl({"prompt": "p", "completion": ["c"]}), "d.jsonl",
                 ["line 1", "'completion' must be a string", "list"], id="completion-not-string"),
    pytest.param(jsonl({"messages": "hi"}), "d.jsonl", ["line 1", "'messages' must be a non-empty list"],
                 id="messages-not-list"),
    pytest.param(jsonl({"text": "a"}, {"messages": []}), "d.jsonl", ["line 2", "non-empty list"],
                 id="messages-empty"),
    pytest.param(jsonl({"messages": [{"role": "robot", "content": "x"}]}), "d.jsonl",
                 ["line 1", "message 0", "'robot'"], id="message-bad-role"),
    pytest.param(jsonl({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]}),
                 "d.jsonl", ["line 1", "message 1", "string 'content'"], id="message-content-not-string"),
    pytest.param(jsonl({"messages": [{"role": "user", "content": "x", "extra": 1}]}), "d.jsonl",
                 ["line 1", "message 0", "'role' and 'content'"], id="message-extra-key"),
    pytest.param(jsonl({"messages": ["user: hi"]}), "d.jsonl", ["line 1", "message 0"],
                 id="message-not-object"),
    pytest.param(jsonl({"text": "a"}, {"text": "  \n "}), "d.jsonl", ["line 2", "empty"], id="blank-text"),
    pytest.param(b"", "d.jsonl", ["'d.jsonl'", "empty"], id="empty-file"),
    pytest.param(b"\n \n\t\n", "d.jsonl", ["empty"], id="whitespace-file"),
    pytest.param(b"", "d.txt", ["'d.txt'", "empty"], id="empty-txt"),
    pytest.param("\u00a0\n".encode(), "d.txt", ["no records"], id="txt-without-records"),
    pytest.param(b'{"text": "a"}\n{"text": "\xff\xfe"}\n', "d.jsonl", ["line 2", "not valid UTF-8"],
                 id="not-utf8"),
    pytest.param(b"fine\n\nalso fine\n\xc3(\n", "d.txt", ["line 4", "not valid UTF-8"], id="not-utf8-txt"),
    pytest.param(b'{"text": "a\x00b"}\n', "d.jsonl", ["NUL", "binary"], id="nul-byte"),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "d.txt", ["NUL", "binary"],
                 id="binary"),
    pytest.param(jsonl({"text": "a"}, {"text": "b" * (MAX_LINE_BYTES + 10)}), "d.jsonl",
                 ["line 2", f"longer than {MAX_LINE_BYTES} bytes"], id="too-long-line"),
    pytest.param(jsonl({"text": "a"}), "d.csv", ["'d.csv'", ".jsonl or .txt"], id="csv-extension"),
    pytest.param(jsonl({"text": "a"}), "dataset", [".jsonl or .txt"], id="no-extension"),
    pytest.param(jsonl({"text": "a"}), "d.jsonl.gz", [".jsonl or .txt"], id="compressed"),
    pytest.param(b'[{"text": "a"}, {"text": "b"}]', "d.json", ["'d.json'", ".jsonl or .txt"],
                 id="json-array-file"),
]


@pytest.mark.parametrize(("data", "filename", "fragments"), REFUSED)
def test_refused(data: bytes, filename: str, fragments: list[str]) -> None:
    with pytest.raises(DatasetError) as info:
        parse_dataset(data, filename)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "Traceback" not in message


@pytest.mark.parametrize(("data", "filename", "limit", "line"), [
    (b'{"text": "a"}\n{"text": "' + b"b" * 120 + b'"}\n', "d.jsonl", 100, 2),
    ("short\n\n".encode() + "é".encode() * 60, "d.txt", 100, 3),  # 60 characters, 120 bytes
])
def test_line_limit_counts_bytes_and_names_the_line(
    data: bytes, filename: str, limit: int, line: int
) -> None:
    with pytest.raises(DatasetError, match=rf"^line {line}: the line is longer than {limit} bytes"):
        parse_dataset(data, filename, max_line_bytes=limit)


def test_a_line_exactly_at_the_limit_is_accepted() -> None:
    record = b'{"text": "' + b"x" * 88 + b'"}'
    assert len(record) == 100
    assert parse_dataset(record + b"\n", "d.jsonl", max_line_bytes=100) == ["x" * 88]


def test_one_bad_line_refuses_the_whole_file() -> None:
    good = jsonl(*({"text": f"record {i}"} for i in range(50)))
    with pytest.raises(DatasetError, match="^line 51: "):
        parse_dataset(good + b"{oops}\n", "d.jsonl")


def test_record_text_uses_the_given_line_number() -> None:
    assert record_text({"text": "t"}, 7) == "t"
    with pytest.raises(DatasetError, match="^line 7: "):
        record_text({"text": ""}, 7)
