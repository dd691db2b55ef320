"""The process boundary around parsers of untrusted files: whatever a parser does (crash, spin, hang, allocate,
write), it becomes one refusal naming the file; a regular file under its cap is parsed and returned."""
import pytest

import ect.untrusted as untrusted
from ect.untrusted import Refused, parse_with
from tests.helpers import ROOT


@pytest.fixture
def source(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the child imports the readers of tests/untrusted_cases.py
    path = tmp_path / "file.bin"
    path.write_bytes(b"abc")
    return path


def test_a_reader_that_succeeds_returns_its_result(source):
    assert parse_with(("tests.untrusted_cases", "echo"), source, 100)["bytes"].tolist() == [97, 98, 99]


@pytest.mark.parametrize("reader, why", [
    ("crash", "stopped by SIGSEGV"),
    ("allocate", "needed more memory"),
    ("write_file", "the parser failed on it"),
])
def test_a_misbehaving_parser_becomes_one_refusal(source, reader, why):
    with pytest.raises(Refused) as err:
        parse_with(("tests.untrusted_cases", reader), source, 100)
    assert str(err.value).startswith(f"{source}: refused: ") and why in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_a_spinning_parser_is_stopped_by_its_cpu_limit_and_a_hanging_one_by_the_deadline(source, monkeypatch):
    monkeypatch.setattr(untrusted, "limits_for", lambda size: (1 << 30, 2))  # 2 s of CPU, a 64 s deadline
    with pytest.raises(Refused, match="more than 2 s of CPU"):
        parse_with(("tests.untrusted_cases", "spin"), source, 100)
    monkeypatch.setattr(untrusted, "limits_for", lambda size: (1 << 30, -28))  # the parent's deadline: 4 s
    with pytest.raises(Refused, match="did not finish within 4 s"):
        parse_with(("tests.untrusted_cases", "sleep"), source, 100)


def test_sources_that_are_not_regular_files_or_too_large_are_refused_before_any_child(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"x" * 101)
    for path, why in (("/dev/zero", "not a regular file"), (tmp_path, "not a regular file"),
                      (tmp_path / "big.bin", "more than the 100")):
        with pytest.raises(Refused, match=why):
            parse_with(("tests.untrusted_cases", "echo"), path, 100)
