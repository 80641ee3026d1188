"""Dataset records: what a submitted file may contain and how each record becomes training text.

Accepted formats, decided by the file name:

* ``.jsonl``: one JSON object per line, each with ``text``; or ``prompt`` and ``completion``; or
  chat ``messages`` (a list of ``{"role": ..., "content": ...}``). Blank lines are skipped.
* ``.txt``: plain UTF-8 text; paragraphs (separated by blank lines) are the records.

Every problem is reported as a :class:`DatasetError` whose message names the line, so that a
submitter can fix the file. Parsing is all-or-nothing: a file with one bad record is refused whole.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator

MAX_LINE_BYTES = 1 << 20  # one record per line; a longer line is almost always a broken export
CHAT_ROLES = ("system", "user", "assistant", "tool")


class DatasetError(ValueError):
    """The dataset cannot be used; the message says where and why."""


def _decode(data: bytes) -> str:
    if b"\x00" in data:
        raise DatasetError("the file contains NUL bytes: it looks binary, not UTF-8 text")
    # Windows tools often start UTF-8 files with a byte-order mark; it is not part of any record.
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(f"line {line}: the file is not valid UTF-8 (byte {exc.start})") from None


def _lines(text: str, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(text.split("\n"), start=1):
        if len(line) > max_line_bytes or len(line.encode("utf-8")) > max_line_bytes:
            raise DatasetError(f"line {number}: the line is longer than {max_line_bytes} bytes")
        yield number, line


def _string_field(record: dict, key: str, number: int) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DatasetError(f"line {number}: field {key!r} must be a string, not {type(value).__name__}")
    return value


def _chat_text(messages: object, number: int) -> str:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"line {number}: field 'messages' must be a non-empty list")
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
            raise DatasetError(f"line {number}: message {i} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise DatasetError(f"line {number}: message {i} has role {role!r}; expected one of {CHAT_ROLES}")
        if not isinstance(content, str):
            raise DatasetError(f"line {number}: message {i} needs a string 'content'")
        parts.append(f"{role}: {content}")
    return "\n".join(parts)


def record_text(record: object, number: int) -> str:
    """The training text of one JSONL record (``number`` is its line, for errors)."""
    if not isinstance(record, dict):
        raise DatasetError(f"line {number}: each line must be a JSON object, not {type(record).__name__}")
    if "text" in record:
        text = _string_field(record, "text", number)
    elif "prompt" in record or "completion" in record:
        if "prompt" not in record or "completion" not in record:
            raise DatasetError(f"line {number}: a record with 'prompt' also needs 'completion' (and back)")
        text = _string_field(record, "prompt", number) + _string_field(record, "completion", number)
    elif "messages" in record:
        text = _chat_text(record["messages"], number)
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DatasetError(
            f"line {number}: a record needs 'text', 'prompt' and 'completion', or 'messages' (it has: {keys})"
        )
    if not text.strip():
        raise DatasetError(f"line {number}: the record's text is empty")
    return text


def parse_jsonl(text: str, max_line_bytes: int = MAX_LINE_BYTES) -> list[str]:
    texts = []
    for number, line in _lines(text, max_line_bytes):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        texts.append(record_text(record, number))
    return texts


def parse_txt(text: str, max_line_bytes: int = MAX_LINE_BYTES) -> list[str]:
    paragraphs: list[str] = []
    current: list[str] = []
    for _, line in _lines(text, max_line_bytes):
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def parse_dataset(data: bytes, filename: str, max_line_bytes: int = MAX_LINE_BYTES) -> list[str]:
    """Validate a whole dataset file and return the training text of every record."""
    name = filename.lower()
    if name.endswith(".jsonl"):
        parse = parse_jsonl
    elif name.endswith(".txt"):
        parse = parse_txt
    else:
        raise DatasetError(f"{filename!r}: the file name must end in .jsonl or .txt")
    if not data.strip():
        raise DatasetError(f"{filename!r} is empty")
    texts = parse(_decode(data), max_line_bytes)
    if not texts:
        raise DatasetError(f"{filename!r} holds no records")
    return texts
