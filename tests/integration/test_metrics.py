"""Prometheus metrics: the endpoint, its names and values, promtool, and a real Prometheus scraping it."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import Sockvisor, connect, free_port, wait_for


def _get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        res = conn.getresponse()
        return res.status, res.getheader("Content-Type") or "", res.read().decode()
    finally:
        conn.close()


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no series {series} in:\n{text[:3000]}")


def _setup(sockvisor: Sockvisor, metrics_port: int, port: int) -> None:
    sockvisor.write_main(f"metrics:\n  listen: 127.0.0.1:{metrics_port}\n")
    sockvisor.unit("acl", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        deny: [127.0.0.2/32]
        exec: [/bin/echo, hi]
    """)


def _traffic(port: int, served: int, denied: int) -> None:
    for _ in range(served):
        with connect(port) as c:
            assert c.recv(16) == b"hi\n"
    for _ in range(denied):
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", port))
            s.recv(16)


def test_metrics_endpoint_names_values_and_errors(sockvisor: Sockvisor) -> None:
    """GET /metrics: SPEC 11's series with exact counts; 404 elsewhere, 405 for POST; bound before ready."""
    mport, port = free_port(), free_port()
    _setup(sockvisor, mport, port)
    sockvisor.start()
    sockvisor.wait_event("metrics_listening")
    _traffic(port, served=3, denied=2)
    wait_for(lambda: sockvisor.unit_status("acl")["connections"]["refused"] == 2
             and len(sockvisor.find("child_exited", unit="acl")) == 3, what="traffic counted")
    status, ctype, text = _get(mport)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert _value(text, 'sockvisor_connections_accepted_total{unit="acl"}') == 3
    assert _value(text, 'sockvisor_connections_refused_total{reason="deny",unit="acl"}') == 2
    assert _value(text, 'sockvisor_connections_refused_total{reason="per_source",unit="acl"}') == 0
    assert _value(text, 'sockvisor_spawns_total{unit="acl"}') == 3
    assert _value(text, 'sockvisor_exits_total{outcome="success",unit="acl"}') == 3
    assert _value(text, 'sockvisor_unit_state{state="listening",unit="acl"}') == 1
    assert _value(text, 'sockvisor_build_info{version="0.1.0"}') == 1
    assert _value(text, 'sockvisor_reloads_total{result="success"}') == 0
    assert "process_resident_memory_bytes" in text and "pid=" not in text
    # status --json carries the same counters the metrics read
    st = sockvisor.unit_status("acl")
    assert st["spawns"] == 3 and st["exits"] == {"success": 3} and st["paused"] is None
    assert _get(mport, "/")[0] == 404
    assert _get(mport, "/metrics", "POST")[0] == 405
    head = _get(mport, "/metrics", "HEAD")
    assert head[0] == 200 and head[2] == ""
    # garbage and a slow client cost nothing: the endpoint still answers
    with socket.create_connection(("127.0.0.1", mport)) as s:
        s.sendall(b"\x00" * 10000)
    assert _get(mport)[0] == 200


def test_reload_moves_the_metrics_endpoint_and_counts_results(sockvisor: Sockvisor) -> None:
    """metrics.listen changes on reload (new bound before old closed); bad reloads are counted by result."""
    mport, port, moved = free_port(), free_port(), free_port()
    _setup(sockvisor, mport, port)
    sockvisor.start()
    sockvisor.wait_event("metrics_listening")
    bad = sockvisor.config / "sockets.d" / "bad.yaml"
    bad.write_text("name: bad\nlisten: [{tcp: nonsense}]\nexec: [/bin/true]\n")
    assert sockvisor.cli("reload", "--config", str(sockvisor.config)).returncode != 0
    bad.unlink()
    sockvisor.write_main(f"metrics:\n  listen: 127.0.0.1:{moved}\n")
    sockvisor.cli("reload", "--config", str(sockvisor.config), check=True)
    text = _get(moved)[2]
    daemon = sockvisor.status()["daemon"]
    assert daemon["reloads"] == {"invalid_config": 1, "success": 1} and daemon["reexecs"] == 0
    assert daemon["pid"] == sockvisor.proc.pid and daemon["version"] == "0.1.0" and daemon["started"] > 0
    assert _value(text, 'sockvisor_reloads_total{result="invalid_config"}') == 1
    assert _value(text, 'sockvisor_reloads_total{result="success"}') == 1
    with pytest.raises(OSError):
        _get(mport)


def test_promtool_finds_the_output_clean(sockvisor: Sockvisor) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/test.sh installs it as root)")
    mport, port = free_port(), free_port()
    _setup(sockvisor, mport, port)
    sockvisor.start()
    sockvisor.wait_event("metrics_listening")
    _traffic(port, served=1, denied=1)
    text = _get(mport)[2]
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr


def test_a_real_prometheus_scrapes_the_accepted_and_refused_counts(sockvisor: Sockvisor) -> None:
    """Debian's prometheus scrapes the daemon; a PromQL query answers the counts this test produced."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package prometheus; scripts/test.sh installs it as root)")
    mport, port, pport = free_port(), free_port(), free_port()
    _setup(sockvisor, mport, port)
    sockvisor.start()
    sockvisor.wait_event("metrics_listening")
    _traffic(port, served=4, denied=3)
    wait_for(lambda: sockvisor.unit_status("acl")["connections"]["refused"] == 3, what="refusals counted")
    work = Path(tempfile.mkdtemp(prefix="sv-prom-"))
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: sockvisor\n    static_configs:\n      - targets: ['127.0.0.1:{mport}']\n")
    prom = subprocess.Popen([binary, f"--config.file={work}/prometheus.yml", f"--storage.tsdb.path={work}/data",
                             f"--web.listen-address=127.0.0.1:{pport}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def query(expr: str) -> float | None:
            url = f"http://127.0.0.1:{pport}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                with urllib.request.urlopen(url, timeout=5) as res:
                    data = json.load(res)
            except OSError:
                return None
            result = data.get("data", {}).get("result", [])
            return float(result[0]["value"][1]) if result else None

        accepted = wait_for(lambda: query('sockvisor_connections_accepted_total{unit="acl"}'), timeout=60,
                            what="prometheus to scrape the daemon")
        refused = query('sum by (unit) (sockvisor_connections_refused_total{unit="acl",reason="deny"})')
        assert (accepted, refused) == (4.0, 3.0)
    finally:
        prom.terminate()
        prom.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def test_log_lines_carry_syslog_priorities_under_the_journal(tmp_path: Path) -> None:
    """JOURNAL_STREAM naming stderr: every line starts <N> (6 info, 4 warning, 3 error); JSON follows."""
    import sys

    conf = tmp_path / "conf"
    (conf / "sockets.d").mkdir(parents=True)
    (conf / "sockvisor.yaml").write_text(f"control:\n  socket: {tmp_path}/control.sock\nlog:\n  format: json\n")
    (conf / "sockets.d" / "x.yaml").write_text(
        f"listen: [{{tcp: '127.0.0.1:{free_port()}'}}]\nstart: eager\nrestart: never\nexec: [/bin/false]\n")
    rfd, wfd = os.pipe()
    st = os.fstat(wfd)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(conf)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=wfd, env=env)
    os.close(wfd)
    out = b""
    try:
        with os.fdopen(rfd, "rb") as r:
            while b'"child_exited"' not in out:
                line = r.readline()
                assert line, out
                out += line
            proc.terminate()
            out += r.read()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = out.decode().splitlines()
    assert lines and all(line[:1] == "<" and line[2:4] == '>{' for line in lines), lines[:5]
    by_event = {json.loads(line[3:])["event"]: line[:3] for line in lines}
    assert by_event["daemon_ready"] == "<6>"
    levels = {json.loads(line[3:])["level"]: line[:3] for line in lines}
    assert levels.get("info") == "<6>" and set(levels) <= {"info", "warning", "error"}
    assert all({"info": "<6>", "warning": "<4>", "error": "<3>"}[k] == v for k, v in levels.items())
