"""Logging for every nomoat process: one setup, two formats, the same fields everywhere.

``setup("plain")`` writes sentences a person reads ("folded version 3 from 4 adapters (jobs
j-ab12): held-out loss 4.1800 -> 4.0500"); ``setup("json")`` writes one JSON object per line for a
log shipper: ``ts`` (unix seconds), ``level``, ``logger``, ``event``, ``message`` and, when the line
is about one, the ids ``job``, ``task``, ``worker``, ``version``, plus the event's own figures.

A state change is logged once, where it happens, with its ids passed through :func:`fields`::

    log.info("task %s leased to worker %s", task_id, worker_id,
             extra=fields("task.leased", task=task_id, job=job_id, worker=worker_id, fence=fence))

The message stays a sentence (the plain format shows only it); the fields are for machines.
Third-party libraries log through the same handler, so a JSON log stays JSON throughout.

:func:`quiet_libraries` turns off the progress bars and chatter of transformers and the Hugging
Face hub; the CLI calls it at its edge and a worker's task entry calls it in its own process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from typing import Any, TextIO

FORMATS = ("plain", "json")
IDS = ("job", "task", "worker", "version")  # the ids every line about one of them carries
_ATTR = "nomoat_fields"  # where fields() puts them on a LogRecord


def fields(event: str, **values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the event's name (``noun.verb``: ``version.folded``) and its
    ids and figures. None values are left out."""
    return {_ATTR: {"event": event, **{k: v for k, v in values.items() if v is not None}}}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call passed with :func:`fields` ({} for a line without them)."""
    return dict(getattr(record, _ATTR, {}))


def _plain_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a loss not measured is null
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, message, then ids and figures."""

    def format(self, record: logging.LogRecord) -> str:
        extra = record_fields(record)
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": extra.pop("event", ""),
            "message": record.getMessage(),
        }
        for key in IDS:
            if key in extra:
                line[key] = extra.pop(key)
        line.update({k: _plain_value(v) for k, v in extra.items()})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """``HH:MM:SS level logger: sentence`` (warnings and errors say so; info does not shout)."""

    def __init__(self) -> None:
        super().__init__()

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()} "
        text = f"{stamp} {level}{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is written, so that a live progress bar
    (rich redirects stderr while it draws) prints log lines above itself instead of through it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def setup(fmt: str = "plain", level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Send every logger's lines to ``stream`` (default: the current stderr) in ``fmt``.

    Replaces the handlers a previous setup installed, so calling it twice is harmless.
    Returns the handler (tests read its stream).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Chatty below warning, and none of it is about what nomoat does.
    for name in ("urllib3", "filelock", "asyncio", "grpc", "ray", "transformers", "huggingface_hub", "torch"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    return handler


# Environment the libraries read for themselves (set before they are imported, and inherited by
# the processes we start, Ray's workers among them).
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # else a warning after every fork
}


def quiet_libraries() -> None:
    """No progress bars or advisory chatter from transformers / the Hugging Face hub.

    Their "Loading weights" bars are meant for notebooks; in a command's output they break up
    our own lines (and a log file fills with carriage returns). Called at the edges: the CLI, a
    worker's task entry. Sets the libraries' own switches if they are already imported, and
    their environment variables for whatever imports them later.
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    # Deprecation notices about transformers' own internals ("is_gradient_checkpointing is
    # deprecated") say nothing a volunteer or a submitter can act on.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|huggingface_hub|peft)(\.|$)")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
