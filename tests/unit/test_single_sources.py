"""Each rule that several modules apply has one source; these tests pin the derived lists to it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import spawn
from supervisor.model import RESERVED_ENVIRONMENT
from tests.unit.test_config_fuzz import errors_of

UNIT = "name: web\nlisten: [{tcp: 127.0.0.1:8080}]\nexec: [/bin/true]\n"


@pytest.mark.parametrize("name", sorted(RESERVED_ENVIRONMENT))
def test_config_refuses_exactly_the_names_spawn_drops(name: str) -> None:
    """Every name spawn would silently drop is refused by the loader, located at the key."""
    lines = errors_of(UNIT + f"environment: {{{name}: x}}\n")
    assert lines == [f"web.yaml:4:15: environment.{name}: is set by sockvisor and cannot be overridden"]


def test_spawn_drops_the_models_list() -> None:
    """spawn reads the reserved names from the model, not a copy of its own."""
    assert spawn.RESERVED_ENVIRONMENT is RESERVED_ENVIRONMENT


def test_check_refuses_remote_addr_with_its_location(tmp_path: Path) -> None:
    """`sockvisor check` on `environment: {REMOTE_ADDR: x}` exits 2 with the key's location (it used to pass)."""
    (tmp_path / "sockets.d").mkdir()
    (tmp_path / "sockets.d" / "web.yaml").write_text(UNIT + "environment: {REMOTE_ADDR: x}\n")
    res = subprocess.run([sys.executable, "-m", "supervisor", "check", "--config", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == ("sockets.d/web.yaml:4:15: environment.REMOTE_ADDR: "
                                  "is set by sockvisor and cannot be overridden")
