import pytest

from glide.errors import CorruptData
from glide.handoff.journal import PhaseJournal


def test_roundtrip_and_missing(tmp_path):
    j = PhaseJournal(tmp_path, "successor")
    assert j.read() is None
    j.write_phase("HELLO", {"pid": 1})
    j.write_phase("READY")
    assert j.read() == {"phase": "READY", "details": {}}


def test_damaged_journal_is_corrupt(tmp_path):
    j = PhaseJournal(tmp_path, "predecessor")
    j.write_phase("FREEZE")
    j.path.write_bytes(b'{"phase": "FRE')
    with pytest.raises(CorruptData):
        j.read()
