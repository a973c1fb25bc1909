"""keyd.bench.instructions: the process it runs under valgrind feeds keyd, and a missing valgrind is
a BenchError, not a traceback."""

from __future__ import annotations

import pytest

from keyd.bench import instructions
from keyd.bench.options import BenchError


def test_the_feed_answers_every_request_with_a_token() -> None:
    # _feed raises BenchError unless every request got a 200.
    assert instructions.main(["--feed", "300", "--type", "user"]) == 0
    assert instructions.main(["--feed", "300", "--type", "app"]) == 0


def test_without_valgrind_it_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(BenchError, match="valgrind is not installed"):
        instructions.count(10, "user")
    assert instructions.main([]) == 1
    assert "valgrind is not installed" in capsys.readouterr().err
