"""Both import parsers fed 20,000 mutated inputs each: a result or a located import error, never a traceback.

The inputs are the Debian corpus and the fixtures, mutated by a deterministic mutator (one
seed per input, so any failure is reproduced by its seed alone): bit flips, deletions,
duplicated lines, inserted syntax tokens (``{ } = += -= \\ " ' % [Section]``), numbers of 5,000
digits, NULs, invalid UTF-8 and very long lines. Each input is written where the importer
reads it (the importers read files: a unit's service and drop-ins, an xinetd includedir),
imported, and the original put back. An input must give an ImportResult whose every unit
renders to YAML that ``yaml.safe_load`` reads back to the unit's data, or raise
ImportSyntaxError or ImportReadError; anything else fails with the seed and the input.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from supervisor.importing import ImportedUnit, ImportReadError, ImportResult, ImportSyntaxError, render_yaml
from supervisor.importing.systemd import import_systemd, parse_unit_text
from supervisor.importing.xinetd import import_xinetd

DATA = Path(__file__).resolve().parent.parent / "data" / "import"
CORPUS = DATA / "corpus"
SERVICES = CORPUS / "services" / "netbase" / "etc" / "services"
INPUTS = 20_000
WORKERS = 2  # the project's machines have 2 cores; each worker mutates its own copy of the inputs
BUDGET = 30.0  # seconds for one parser's inputs on those machines (measured: about half of it)

HUGE = b"9" * 5000
TOKENS = [
    b"{", b"}", b"=", b"+=", b"-=", b"\\", b'"', b"'", b"%", b"[Section]", b"[Socket]", b"[Service]", b"[Unit]",
    b"[Install]", b"\n", b"\\\n", b"#", b";", b" ", b"\t", b"@", b":", b"/", b"%i", b"%H", b"%%", b"{\n", b"}\n",
    b"service x\n{\n", b"defaults\n{\n", b"include ", b"includedir ", b"ListenStream=", b"ListenDatagram=",
    b"Accept=yes\n", b"ExecStart=", b"Service=", b"Alias=", b"UNLIMITED", b"0", b"-1", b"infinity",
    "\u00b2".encode(), "\u0663".encode(), "\u00e9".encode(), "\u2028".encode(), b"0x", b"[::]:", b"vsock:",
    b"{1,2}", b"0.0.0.0", b"127.0.0.1/33", b"-", b"!!", b"+", b"$X", b"${X}", b"\\x00", b"\\u12", b"\r",
]  # fmt: skip
VALUES = [
    HUGE, b"-" + HUGE, b"0." + HUGE, b"1e999", b"", b"0", b"-0", "\u00b2".encode(),
    "\u0663\u0663".encode(), b"4294967296", b"infinity", b"yes", b"no", b"maybe", b"5min 3", b"1" + b"K" * 3,
    b"0777", b"99999", b"@", b"/", b"x" * 300, b"[::1]:99999", b"localhost", b"%n%i%I%p%t", b"a=b c='d e'",
]  # fmt: skip
BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82"]
_ASSIGNMENT = re.compile(rb"=")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with one to four random mutations; the same ``rng`` state gives the same bytes."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(100)
        pos = rng.randrange(len(buf) + 1)
        lines = bytes(buf).split(b"\n")
        if op < 12 and buf:  # flip one bit
            at = min(pos, len(buf) - 1)
            buf[at] ^= 1 << rng.randrange(8)
        elif op < 24 and buf:  # delete a span
            del buf[pos : pos + rng.choice((1, 2, 5, 20, 200))]
        elif op < 36:  # duplicate a line, once or many times
            index = rng.randrange(len(lines))
            lines[index:index] = [lines[index]] * rng.choice((1, 1, 2, 50))
            buf = bytearray(b"\n".join(lines))
        elif op < 56:  # insert a syntax token
            buf[pos:pos] = rng.choice(TOKENS)
        elif op < 74:  # replace a value after '=' on some line
            candidates = [i for i, line in enumerate(lines) if _ASSIGNMENT.search(line)]
            if candidates:
                index = rng.choice(candidates)
                key = lines[index].split(b"=", 1)[0]
                lines[index] = key + rng.choice((b"=", b"= ", b"+= ", b"-= ")) + rng.choice(VALUES)
                buf = bytearray(b"\n".join(lines))
        elif op < 79:  # a number of 5,000 digits anywhere
            buf[pos:pos] = HUGE
        elif op < 83:  # a NUL
            buf[pos:pos] = b"\x00"
        elif op < 87:  # invalid UTF-8
            buf[pos:pos] = rng.choice(BAD_UTF8)
        elif op < 92:  # a very long line, of few words
            # Kept to thousands of characters, a hundred thousand now and then: a long value that
            # reaches a unit costs the pure-Python YAML loader about a microsecond a character.
            length = 100_000 if rng.random() < 0.1 else rng.choice((2_000, 5_000, 10_000, 20_000))
            buf[pos:pos] = rng.choice((b"a", b"\\", b"%", b"{1,2}", b"=", b"9")) * length
        else:  # swap two lines
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
            buf = bytearray(b"\n".join(lines))
    return bytes(buf)


@dataclass
class Group:
    """Files copied under one directory that one import reads; ``entry`` is what it is given."""

    root: Path
    entry: Path
    run: Callable[[Path], ImportResult]
    files: list[Path] = field(default_factory=list)  # what a mutation may hit, the entry first


def copy_tree(source: Path, target: Path) -> list[Path]:
    files = sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.relative_to(source))
    return [target / p.relative_to(source) for p in files]


def resolve(name: str) -> list[str]:
    if name == "localhost":
        return ["127.0.0.1", "::1"]
    raise OSError(f"{name}: Name or service not known")


def trimmed_services(tmp: Path) -> Path:
    """netbase's /etc/services cut to the names the xinetd inputs use: the same lookups, read faster."""
    names = {m.group(1) for path in [*(CORPUS / "xinetd").rglob("*"), *(DATA / "xinetd").rglob("*")] if path.is_file()
             for m in re.finditer(r"service\s+(\S+)", path.read_text())}  # fmt: skip
    lines = [line for line in SERVICES.read_text().splitlines() if names & set(line.split("#", 1)[0].split())]
    path = tmp / "services"
    path.write_text("\n".join(lines) + "\n")
    return path


def xinetd_groups(tmp: Path) -> list[Group]:
    """The xinetd package as installed (xinetd.conf over its xinetd.d), every other file alone, the fixtures."""
    groups: list[Group] = []
    services = trimmed_services(tmp)

    def run_under(root: Path, services: Path) -> Callable[[Path], ImportResult]:
        return lambda entry: import_xinetd([str(entry)], services_file=str(services), resolve=resolve, root=str(root))

    package = tmp / "xinetd-package"
    files = copy_tree(CORPUS / "xinetd" / "xinetd" / "etc", package / "etc")
    entry = package / "etc" / "xinetd.conf"
    groups.append(Group(package, entry, run_under(package, services), [entry, *(f for f in files if f != entry)]))
    alone = [p for p in (CORPUS / "xinetd").rglob("*") if p.is_file() and "xinetd/xinetd/etc" not in str(p)]
    for index, path in enumerate(sorted(alone)):
        root = tmp / f"x{index}"
        root.mkdir()
        entry = root / path.name
        shutil.copyfile(path, entry)
        groups.append(Group(root, entry, run_under(root, services), [entry]))
    fixtures = tmp / "xinetd-fixtures"
    files = [f for f in copy_tree(DATA / "xinetd", fixtures) if f.name != "services"]
    entry = fixtures / "xinetd.conf"
    groups.append(Group(fixtures, entry, run_under(fixtures, DATA / "xinetd" / "services"),
                        [entry, *(f for f in files if f != entry)]))  # fmt: skip
    return groups


def _service_names(socket: Path) -> list[str]:
    """The services ``socket`` may activate: NAME.service, NAME@.service, Service=, and syslog's Alias=."""
    stem = socket.name.removesuffix(".socket")
    names = [stem + ".service", stem.partition("@")[0] + "@.service", "rsyslog.service"]
    names += [a.value for a in parse_unit_text(socket.read_text(), str(socket)) if a.key == "Service"]
    return names


def systemd_groups(tmp: Path) -> list[Group]:
    """One group per .socket: its package's unit files in one directory; the fixtures with their unit directory."""
    groups: list[Group] = []
    packages: dict[Path, list[Path]] = {}
    for package in sorted((CORPUS / "systemd").iterdir()):
        flat = tmp / package.name
        flat.mkdir()
        for path in sorted(p for p in package.rglob("*") if p.is_file()):
            shutil.copyfile(path, flat / path.name)
        packages[flat] = sorted(flat.iterdir())
    everything = {f.name: f for files in packages.values() for f in files}
    for flat, files in packages.items():
        for socket in (f for f in files if f.suffix == ".socket"):
            names = _service_names(socket)
            services = [f for f in files if f.name in names]
            if not services:  # another package's (dbus.socket's dbus.service; syslog.socket's rsyslog.service)
                source = next(everything[name] for name in names if name in everything)
                shutil.copyfile(source, flat / source.name)
                services = [flat / source.name]

            def run(entry: Path) -> ImportResult:
                return import_systemd([str(entry)], unit_dirs=[])

            groups.append(Group(flat, socket, run, [socket, *services]))
    fixtures = tmp / "systemd-fixtures"
    files = copy_tree(DATA / "systemd", fixtures)
    lib = str(fixtures / "lib")
    for socket in sorted(f for f in files if f.suffix == ".socket"):

        def run_fixture(entry: Path) -> ImportResult:
            return import_systemd([str(entry)], unit_dirs=[lib])

        groups.append(Group(fixtures, socket, run_fixture, [socket, *(f for f in files if f != socket)]))
    return groups


class RoundTrip:
    """Every render_yaml output loads back with yaml.safe_load to the unit's data.

    A document is its head (``# imported from ...`` and one ``# ...`` line per comment) and the
    YAML of the data. The head is checked on every document to be just comment lines (printable,
    so without any of YAML's line breaks), which YAML skips: the document loads as its body does.
    So the body is what is loaded, once per distinct body (the comments of a unit with many
    directives not carried over are most of its text, and the pure-Python scanner reads them
    character by character).
    """

    def __init__(self) -> None:
        self.bodies: dict[str, object] = {}

    def check(self, unit: ImportedUnit) -> None:
        text = render_yaml(unit)
        lines = text.split("\n")
        head = 1 + len(unit.comments)
        assert lines[0].startswith("# imported from ") and all(line.startswith("# ") for line in lines[:head])
        assert all(line.isprintable() for line in lines[:head]), "a comment line with a control character"
        body = "\n".join(lines[head:])
        if body not in self.bodies:
            self.bodies[body] = yaml.safe_load(body)
        assert self.bodies[body] == unit.data


@dataclass
class Outcome:
    """How one worker's inputs ended; ``failure`` says which input raised what (empty: none did)."""

    result: int = 0
    syntax: int = 0
    read: int = 0
    units: int = 0
    loaded: int = 0
    failure: str = ""


def fuzz(parser: str, groups: list[Group], seeds: range) -> Outcome:
    """Feed the input of each seed through ``groups``; stops at the first input that raises anything else."""
    originals = {path: path.read_bytes() for group in groups for path in group.files}
    outcome = Outcome()
    round_trip = RoundTrip()
    for seed in seeds:
        rng = random.Random(f"{parser}:{seed}")
        group = rng.choice(groups)
        target = group.files[0] if rng.random() < 0.6 else rng.choice(group.files)
        text = mutate(originals[target], rng)
        target.write_bytes(text)
        try:
            result = group.run(group.entry)
            for unit in result.units:
                round_trip.check(unit)
            for dropped in result.dropped:
                assert "\n" not in str(dropped)
        except ImportSyntaxError:
            outcome.syntax += 1
        except ImportReadError:
            outcome.read += 1
        except Exception as exc:
            shown = repr(text) if len(text) <= 20_000 else repr(text[:20_000]) + f"... ({len(text)} bytes)"
            outcome.failure = (f"{parser} seed {seed}: {target.relative_to(group.root)} (imported as "
                               f"{group.entry.relative_to(group.root)}) raised {exc!r}\ninput: {shown}")  # fmt: skip
            return outcome
        else:
            outcome.result += 1
            outcome.units += len(result.units)
        finally:
            target.write_bytes(originals[target])
    outcome.loaded = len(round_trip.bodies)
    return outcome


def fuzz_part(parser: str, part: int, parts: int, scratch: str) -> Outcome:
    """One worker's share (every ``parts``-th seed), on its own copy of the inputs."""
    with tempfile.TemporaryDirectory(dir=scratch) as directory:
        groups = xinetd_groups(Path(directory)) if parser == "xinetd" else systemd_groups(Path(directory))
        return fuzz(parser, groups, range(part, INPUTS, parts))


def scratch_dir(tmp_path: Path) -> Path:
    """Where the inputs are written: /dev/shm (memory) when there is one; each input is two writes."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path


@pytest.mark.parametrize("parser", ["xinetd", "systemd"])
def test_mutated_inputs_never_raise_a_traceback(tmp_path: Path, parser: str) -> None:
    """20,000 mutated corpus and fixture files per parser: an ImportResult or a located import error, each."""
    started = time.monotonic()
    jobs = [(parser, part, WORKERS, str(scratch_dir(tmp_path))) for part in range(WORKERS)]
    if "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
            outcomes = pool.starmap(fuzz_part, jobs)
    else:
        outcomes = [fuzz_part(*job) for job in jobs]
    elapsed = time.monotonic() - started
    failures = [o.failure for o in outcomes if o.failure]
    assert not failures, failures[0]
    total = Outcome(**{key: sum(getattr(o, key) for o in outcomes) for key in ("result", "syntax", "read", "units",
                                                                                "loaded")})  # fmt: skip
    print(f"{parser}: {INPUTS} inputs in {elapsed:.1f}s: {total}")
    assert total.result + total.syntax + total.read == INPUTS
    # The mutations reach both the error paths and the translation behind them.
    assert total.syntax > INPUTS // 20 and total.result > INPUTS // 4 and total.loaded > 1000
    assert elapsed < BUDGET, f"{parser}: {INPUTS} inputs took {elapsed:.1f}s"
