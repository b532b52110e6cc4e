"""bench/idle.py's reading of a `perf sched timehist --state` trace: each idle stretch goes to
what was queued on another CPU, or to a spawner held in vfork(), or to nothing at all."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def idle():
    spec = importlib.util.spec_from_file_location("bench_idle", BENCH / "idle.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_idle"] = module  # its dataclass looks itself up there
    try:
        spec.loader.exec_module(module)  # it imports bench/accept.py, from its own directory
        yield module
    finally:
        del sys.modules["bench_idle"]


def row(end: float, cpu: int, task: str, delay_ms: float, run_ms: float, state: str) -> str:
    """One line as perf prints it: switch-out time, CPU, task[tid/pid], wait, sch delay, run time (ms), state."""
    return f"{end:15.6f} [{cpu:04d}]  {task:<30}  {0:9.3f}  {delay_ms:9.3f}  {run_ms:9.3f}  {state:>5} "


# Seconds. CPU 0: the spawner thread 101 of process 100 ("python") runs, then sleeps in vfork()
# (state D) from 0.45 to 0.50; CPU 0 is idle from 0.45 to 0.50 and from 0.60 to 0.61, when the
# thread is asleep in state S. CPU 1: "hello" runs 0.40-0.47, then the vfork child (pid 200, still
# "python") that waited behind it from 0.45 runs 0.47-0.48. Rows at 0 and 1 s set the window.
TRACE = "\n".join([
    "           time    cpu  task name                       wait time  sch delay   run time  state",
    row(0.000, 0, "kworker/0:1[7]", 0, 0, "I"),
    row(0.450, 0, "python[101/100]", 0.0, 50.0, "D"),
    row(0.500, 0, "<idle>", 0, 50.0, "I"),
    row(0.550, 0, "python[101/100]", 0.0, 50.0, "S"),
    row(0.600, 0, "loadgen[300]", 0.0, 50.0, "S"),
    row(0.610, 0, "<idle>", 0, 10.0, "I"),
    row(0.470, 1, "hello[199]", 0.0, 70.0, "Z"),
    row(0.480, 1, "python[200]", 20.0, 10.0, "R"),
    row(1.000, 1, "kworker/1:1[8]", 0, 0, "I"),
])


def test_parse_reads_every_task_row_and_idle_row(idle):
    slices, idles = idle.parse_timehist(TRACE)
    assert {(s.comm, s.tid, s.pid) for s in slices} >= {("python", 101, 100), ("python", 200, 200),
                                                       ("hello", 199, 199), ("loadgen", 300, 300)}
    assert idles[0] == [pytest.approx((0.45, 0.50)), pytest.approx((0.60, 0.61))]
    child = next(s for s in slices if s.tid == 200)
    assert (child.wait, child.start, child.end, child.state) == (pytest.approx(0.45), pytest.approx(0.47),
                                                                 pytest.approx(0.48), "R")


def test_each_idle_stretch_is_attributed_once(idle):
    slices, idles = idle.parse_timehist(TRACE)
    parts = idle.attribute(slices, idles, spawner_pid=100, spawner_comm="python", program="hello")
    total = 0.8 * 2  # the window 0.1-0.9 s on two CPUs
    assert parts["idle"] == pytest.approx(100 * 0.06 / total)
    assert parts["waited: child before exec"] == pytest.approx(100 * 0.02 / total, rel=0.01)
    assert parts["nothing runnable: a spawner held in vfork"] == pytest.approx(100 * 0.03 / total, rel=0.01)
    assert parts["nothing runnable: spawners asleep"] == pytest.approx(100 * 0.01 / total, rel=0.01)
    assert "waited: spawner thread" not in parts
    assert sum(v for k, v in parts.items() if k != "idle") == pytest.approx(parts["idle"], rel=0.01)


def test_spawner_threads_cpu_and_delay(idle):
    slices, _ = idle.parse_timehist(TRACE)
    assert idle.per_thread(slices, 100) == [(101, pytest.approx(0.10), pytest.approx(0.0), 2)]
