"""Run both importers over the Debian corpus and print docs/import-corpus.md (Markdown) on stdout.

    .venv/bin/python scripts/import_table.py > docs/import-corpus.md

The inputs are the ones tests/unit/test_import_corpus.py imports: for xinetd, the xinetd
package's /etc/xinetd.conf over the /etc/xinetd.d files of every package (a system with all of
them installed), and each example file on its own; for systemd, every .socket at once, with
every package's unit directory searched for the services. Each corpus file is read by one
import only, so no setting is counted twice. Host names resolve from a fixed table (no DNS).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor.importing import Dropped, ImportResult  # noqa: E402  (after the path is set)
from supervisor.importing.systemd import import_systemd  # noqa: E402
from supervisor.importing.xinetd import import_xinetd  # noqa: E402

CORPUS = ROOT / "tests" / "data" / "import" / "corpus"
SERVICES = CORPUS / "services" / "netbase" / "etc" / "services"
XINETD = CORPUS / "xinetd"
SYSTEMD = CORPUS / "systemd"
HOSTS = {"localhost": ["127.0.0.1", "::1"]}
RERUN = ".venv/bin/python scripts/import_table.py > docs/import-corpus.md"


def resolve(name: str) -> list[str]:
    """Host names from a fixed table: the corpus is imported without DNS."""
    if name in HOSTS:
        return HOSTS[name]
    raise OSError(f"{name}: Name or service not known")


@dataclass
class Kind:
    """What one source kind's imports added up to."""

    name: str
    files: int = 0
    units: int = 0
    settings: int = 0
    carried: int = 0
    dropped: list[Dropped] = field(default_factory=list)

    def add(self, result: ImportResult) -> None:
        self.units += len(result.units)
        self.settings += result.settings
        self.carried += result.carried
        self.dropped.extend(result.dropped)


def import_xinetd_corpus() -> Kind:
    kind = Kind("xinetd", files=sum(1 for p in XINETD.rglob("*") if p.is_file()))
    shipped = sorted(XINETD.glob("*/etc/xinetd.d/*"))
    with tempfile.TemporaryDirectory() as tmp:
        system = Path(tmp)
        (system / "etc" / "xinetd.d").mkdir(parents=True)
        shutil.copy(XINETD / "xinetd" / "etc" / "xinetd.conf", system / "etc")
        for path in shipped:
            shutil.copy(path, system / "etc" / "xinetd.d" / path.name)
        conf = str(system / "etc" / "xinetd.conf")
        kind.add(import_xinetd([conf], services_file=str(SERVICES), resolve=resolve, root=str(system)))
    examples = sorted(p for p in XINETD.rglob("*") if p.is_file() and p not in shipped and p.name != "xinetd.conf")
    for path in examples:
        kind.add(import_xinetd([str(path)], services_file=str(SERVICES), resolve=resolve))
    return kind


def import_systemd_corpus() -> Kind:
    kind = Kind("systemd", files=sum(1 for p in SYSTEMD.rglob("*") if p.is_file()))
    sockets = sorted(str(p) for p in SYSTEMD.rglob("*.socket"))
    patterns = ("*/lib/systemd/system", "*/usr/lib/systemd/system")
    dirs = sorted(str(d) for pattern in patterns for d in SYSTEMD.glob(pattern))
    kind.add(import_systemd(sockets, unit_dirs=dirs))
    return kind


# A reason names the service, file or value it was about; these rewrite it to what it has in
# common with the others of its key, so that they group.
_REASON_PATTERNS = [
    (re.compile(r"^service \S+ is not imported: "), "service not imported: "),
    (re.compile(r"with id '[^']*' is already defined at \S+"), "with the same id is already defined"),
    (re.compile(r"no port, and \S+ is not in \S+"), "no port, and the name is not in /etc/services"),
    (re.compile(r"internal service \S+ has"), "the internal service has"),
    (re.compile(r"specifier %\w is"), "a host-specific specifier is"),
    (re.compile(r"^Type=\S+: "), ""),
]


def reason(why: str) -> str:
    for pattern, replacement in _REASON_PATTERNS:
        why = pattern.sub(replacement, why)
    return why.replace("|", "\\|")


def main() -> None:
    kinds = [import_xinetd_corpus(), import_systemd_corpus()]
    packages = {p.parts[0] for kind in ("xinetd", "systemd") for p in (
        f.relative_to(CORPUS / kind) for f in (CORPUS / kind).rglob("*") if f.is_file())}  # fmt: skip
    out = [
        "# `sockvisor import` on Debian's own configurations",
        "",
        "What the importers make of real configuration files: every xinetd service file and every system "
        f"`.socket` unit (with the service it activates) that {len(packages)} Debian 12 (bookworm) packages ship, "
        "kept as they are in `tests/data/import/corpus/` (`SOURCES.md` there names each file's package and "
        "version). Every file imports with exit 0 and every unit passes `sockvisor check` "
        "(`tests/unit/test_import_corpus.py`). A *setting* is one assignment line of a source file; it is "
        "*carried over* when it was translated without a warning (one that a later line overrides counts as "
        "honoured), and *not carried over* when it got a `not carried over` warning or belongs to a service "
        "that could not be imported at all (RPC, TCPMUX, xinetd's internal listings). A warning is one "
        "`FILE:LINE: KEY: not carried over: why` line on stderr. xinetd is imported as a system with every "
        "package installed (`/etc/xinetd.conf` over all their `/etc/xinetd.d` files) plus each example "
        "file on its own; systemd as every `.socket` at once. Regenerate this page with "
        f"`{RERUN}`.",
        "",
        "| source | files | units | settings | carried over | not carried over | warnings |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in kinds:
        share = f" ({100 * kind.carried / kind.settings:.0f}%)" if kind.settings else ""
        out.append(f"| {kind.name} | {kind.files} | {kind.units} | {kind.settings} | {kind.carried}{share} | "
                   f"{kind.settings - kind.carried} | {len(kind.dropped)} |")  # fmt: skip
    out += [
        "",
        "## What is not carried over, and why",
        "",
        "Each warning, grouped by source, key and reason (the reason with the names in it taken out).",
        "",
        "| source | key | warnings | why |",
        "| --- | --- | ---: | --- |",
    ]
    for kind in kinds:
        groups = Counter((d.key, reason(d.why)) for d in kind.dropped)
        for (key, why), count in sorted(groups.items(), key=lambda item: (-item[1], item[0])):
            out.append(f"| {kind.name} | `{key}` | {count} | {why} |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
