"""No library progress noise in our commands' output: transformers' bars are switched off at our edges."""

from __future__ import annotations

import re

import pytest
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from nomoat import logs
from nomoat.tiny import tiny_model_path

BAR = re.compile(r"it/s\]|Loading weights|\d+%\|")


@pytest.fixture
def bars_back_on():
    yield
    hf_logging.enable_progress_bar()


def test_a_model_load_prints_bars_unless_quieted(capfd, bars_back_on) -> None:
    # The control: with transformers' own default a load draws its "Loading weights" bar (so the
    # check below can see one) ...
    hf_logging.enable_progress_bar()
    AutoModelForCausalLM.from_pretrained(tiny_model_path())
    noisy = capfd.readouterr()
    assert BAR.search(noisy.err + noisy.out), "the control load drew no bar: the check cannot see one"
    # ... and after our edge has quieted the libraries, the same load prints nothing at all.
    logs.quiet_libraries()
    AutoModelForCausalLM.from_pretrained(tiny_model_path())
    quiet = capfd.readouterr()
    assert not BAR.search(quiet.err + quiet.out), quiet.err
    assert "\r" not in quiet.err


def test_quieting_reaches_the_processes_we_start(monkeypatch) -> None:
    for key in logs.QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    logs.quiet_libraries()
    import os

    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # Ray's workers and the demo's inherit it


def test_the_cli_edge_quiets_the_libraries(monkeypatch) -> None:
    from click.testing import CliRunner

    from nomoat.cli import main

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    try:
        CliRunner().invoke(main, ["status", "--help"])
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
