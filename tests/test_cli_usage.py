"""CLI usage errors (unknown option, missing option, bad value, unknown command) print a short usage message and
exit 2, never a traceback; `scpert runs --kind` shows the stage's own columns."""

from __future__ import annotations

import sys

import pytest

from scpert_dist.cli import main


def _run(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["scpert", *argv])
    with pytest.raises(SystemExit) as ex:
        main()
    cap = capsys.readouterr()
    return ex.value.code, cap.out + cap.err


@pytest.mark.parametrize(("argv", "said"), [
    (["runs", "--bogus"], "No such option: --bogus"),
    (["predict", "--model", "x"], "Missing option"),
    (["runs", "--max-runs", "abc"], "Invalid value for '--max-runs'"),
    (["nocommand"], "No such command 'nocommand'"),
    (["runs", "--kind", "pretraining"], "Invalid value for '--kind'"),
])
def test_usage_errors_are_short_and_exit_2(monkeypatch, capsys, argv, said):
    code, text = _run(monkeypatch, capsys, *argv)
    assert code == 2
    assert said in text
    assert "Usage: scpert" in text and "--help" in text
    assert "Traceback" not in text and len(text.splitlines()) <= 6, text


def test_named_error_exits_2_without_traceback(monkeypatch, capsys, tmp_path):
    code, text = _run(monkeypatch, capsys, "sweep", "--config", str(tmp_path / "absent.yaml"))
    assert code == 2 and "error:" in text and "Traceback" not in text, text
