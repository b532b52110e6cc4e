"""The test harness itself: a process that outlives the daemon holding its stderr does not stall
the suite (closing the pipe under the reader would block for as long as that process lives, and
no test timeout interrupts it); it is killed and the test is failed with who it was."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from tests.conftest import Sockvisor, wait_for


def test_a_process_holding_the_daemons_stderr_after_it_exits_is_killed_and_reported(short_tmp: Path) -> None:
    sv = Sockvisor(short_tmp)
    daemon = shlex.join([sys.executable, "-m", "supervisor", "run", "--config", str(sv.config)])
    # The wrapper leaves a sleep behind with the daemon's stderr (its stdin is /dev/null).
    sv.start(argv=["sh", "-c", f"sleep 3600 & echo $! > {short_tmp}/sleeper; exec {daemon}"])
    sleeper = int((short_tmp / "sleeper").read_text())
    assert Path(f"/proc/{sleeper}").exists()
    began = time.monotonic()
    assert sv.stop() == 0
    assert time.monotonic() - began < 30  # the reader's 10 s, the kill, and a second join at most
    assert len(sv.leaked) == 1 and sv.leaked[0].startswith(f"{sleeper} (sleep 3600"), sv.leaked
    assert sv.proc is not None and sv.proc.stderr is not None and sv.proc.stderr.closed

    def gone() -> bool:  # no longer our business to reap: gone, or a zombie of whoever adopted it
        try:
            return "State:\tZ" in Path(f"/proc/{sleeper}/status").read_text()
        except FileNotFoundError:
            return True

    wait_for(gone, timeout=10, what="the sleeper killed")
