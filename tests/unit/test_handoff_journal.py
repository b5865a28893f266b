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


def test_crash_point_kills_at_named_point(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    code = (
        "from glide.handoff.crash_points import crash_point, S_AFTER_READY, S_AFTER_WARMING\n"
        "crash_point(S_AFTER_WARMING); print('a', flush=True)\n"
        "crash_point(S_AFTER_READY); print('b', flush=True)\n"
    )
    env = dict(os.environ, GLIDE_CRASH_POINT="handoff.s.after_ready")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL
    assert p.stdout == "a\n"


def test_journal_survives_sigkill_mid_write(tmp_path):
    import random
    import subprocess
    import sys
    import time

    code = (
        "import sys\nfrom glide.handoff.journal import PhaseJournal\n"
        "j = PhaseJournal(sys.argv[1], 'successor')\n"
        "i = 0\nwhile True:\n    j.write_phase(f'P{i}', {'pad': 'x' * 4096}); i += 1\n"
    )
    j = PhaseJournal(tmp_path, "successor")
    for _ in range(8):
        p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
        time.sleep(0.15 + random.random() * 0.2)
        p.kill()
        p.wait()
        rec = j.read()
        assert rec is None or (rec["phase"].startswith("P") and len(rec["details"]["pad"]) == 4096)
