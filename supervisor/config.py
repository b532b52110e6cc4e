"""Reading and validating the configuration: YAML files in, a ``Config`` out.

Theory of operation: ``load_config`` finds the main config and the unit files
(SPEC sections 1-2), reads them, and hands each text to ``yamlload.compose``,
which yields located values. A ``reader.Reader`` then walks every document
against the schema of SPEC section 3 (``schema``: key tables and value
converters) and builds the frozen model objects. Every check
appends a ``Problem`` (location, key path, message) to one list and carries on
with a default, so a single pass reports every problem, never only the first.
If the list is non-empty at the end, ``ConfigError`` carries all of it and no
``Config`` escapes: a caller gets either a fully valid configuration or
every reason why not.

The schema lives in tables (``schema.UNIT_KEYS``, ``schema.LISTEN_PARSERS``, ...) so that
unknown keys, "did you mean" hints and "only applies to ..." messages come
from the same source of truth as the parsing. Value syntax (durations, modes,
addresses) lives in ``values`` and ``addresses``, which raise ``ValueError``;
this module only adds where.

Key paths index lists from 0: ``listen[1]`` is the second listen entry.
File names in messages are relative to the config directory when under it.
This module does I/O only to read files and never reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shlex
from collections.abc import Mapping

from supervisor import envfile
from supervisor.errors import ConfigError, Location, Problem
from supervisor.model import (
    DEFAULT_CONFIG_DIR,
    RESERVED_ENVIRONMENT,
    Config,
    FileRef,
    MainConfig,
    Mode,
    Unit,
)
from supervisor.reader import Reader
from supervisor.yamlload import (
    location_of_prefix,
)

MAIN_CONFIG_NAME = "sockvisor.yaml"
CONFIG_ENV = "SOCKVISOR_CONFIG"

# ----------------------------------------------------------------------------
# Public API


def config_path(path: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The config file or directory to read: ``path``, else ``$SOCKVISOR_CONFIG``, else /etc/sockvisor."""
    if path:
        return path
    if environ is not None and environ.get(CONFIG_ENV):
        return environ[CONFIG_ENV]
    return DEFAULT_CONFIG_DIR


def load_config(path: str | None = None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the whole configuration.

    Args:
        path: a main config file, or a directory holding ``sockvisor.yaml`` and
            ``sockets.d/``; None for ``$SOCKVISOR_CONFIG`` or ``/etc/sockvisor``.
        environ: the environment to take ``SOCKVISOR_CONFIG`` from (never os.environ).
    Returns:
        The configuration, every unit validated (disabled ones included).
    Raises:
        ConfigError: with every problem found, each located.
    """
    source = config_path(path, environ)
    base, main_file = _locate(source)
    problems: list[Problem] = []
    reader = Reader(problems)
    main = MainConfig()
    if main_file is not None:
        text = _read(main_file, _display(main_file, base), problems)
        if text is not None:
            main = reader.main_from_text(text, _display(main_file, base))

    units: list[Unit] = []
    for file in _unit_files(base, main.include, exclude=main_file):
        display = _display(file, base)
        text = _read(file, display, problems)
        if text is not None:
            units.extend(reader.units_from_text(text, display, _stem(file)))
    reader.check_across_units(units)
    units = [_read_unit_files(u, problems) for u in units]
    if problems:
        raise ConfigError(problems)
    return Config(main=main, units=tuple(_anchor_exec(u, base) for u in units), source=source)


FILE_MAX = 1 << 20  # an environment file or banner larger than this is refused


def _read_ref(ref: FileRef, key: str, problems: list[Problem]) -> FileRef:
    """``ref`` with its content read (a missing optional file reads as empty)."""
    try:
        with open(ref.path, "rb") as f:
            content = f.read(FILE_MAX + 1)
    except FileNotFoundError:
        if not ref.optional:
            problems.append(Problem(ref.location, key,
                                    f"{ref.path}: no such file (prefix it with - to make it optional)"))
        return ref
    except OSError as exc:
        problems.append(Problem(ref.location, key, f"{ref.path}: cannot read: {exc.strerror}"))
        return ref
    if len(content) > FILE_MAX:
        problems.append(Problem(ref.location, key, f"{ref.path}: larger than {FILE_MAX} bytes"))
        return ref
    return dataclasses.replace(ref, content=content)


def _read_unit_files(unit: Unit, problems: list[Problem]) -> Unit:
    """Read what the unit's ``environment_files`` and banners name, as the configuration is loaded."""
    changes: dict[str, object] = {}
    files = []
    for index, ref in enumerate(unit.process.environment_files):
        key = f"environment_files[{index}]"
        ref = _read_ref(ref, key, problems)
        try:
            for name, _ in envfile.parse(ref.content.decode("utf-8")):
                if name in RESERVED_ENVIRONMENT:
                    problems.append(Problem(ref.location, key, f"{ref.path}: {name} is set by sockvisor and "
                                                                "cannot be overridden"))
        except UnicodeDecodeError:
            problems.append(Problem(ref.location, key, f"{ref.path}: not UTF-8 text"))
        except envfile.EnvFileError as exc:
            problems.append(Problem(Location(ref.path, exc.line, 1), key, str(exc)))
        files.append(ref)
    if files:
        changes["process"] = dataclasses.replace(unit.process, environment_files=tuple(files))
    for key in ("banner", "banner_success", "banner_fail"):
        ref = getattr(unit, key)
        if ref is not None:
            changes[key] = _read_ref(ref, key, problems)
    return dataclasses.replace(unit, **changes) if changes else unit  # type: ignore[arg-type]


def _anchor_exec(unit: Unit, base: str) -> Unit:
    """A relative program path with a slash (``examples/web.py``) is relative to the config directory.

    systemd requires absolute paths; this extension lets a config directory
    ship its own programs (the example config does). Bare names are searched
    on the child's PATH at spawn time.
    """
    if not unit.process.exec:
        return unit  # a proxy that only forwards runs nothing
    program = unit.process.exec[0]
    if "/" not in program or os.path.isabs(program):
        return unit
    anchored = os.path.normpath(os.path.join(os.path.abspath(base), program))
    process = dataclasses.replace(unit.process, exec=(anchored, *unit.process.exec[1:]))
    return dataclasses.replace(unit, process=process)


def load_main(path: str | None = None, *, environ: Mapping[str, str] | None = None) -> MainConfig:
    """Read only the main config (for control commands: a broken unit must not hide the control socket).

    Args:
        path: as for ``load_config``.
        environ: the environment to take ``SOCKVISOR_CONFIG`` from.
    Returns:
        The main config; all defaults when a config directory has no ``sockvisor.yaml``.
    Raises:
        ConfigError: the path does not exist or the main config is invalid.
    """
    base, main_file = _locate(config_path(path, environ))
    if main_file is None:
        return MainConfig()
    problems: list[Problem] = []
    display = _display(main_file, base)
    text = _read(main_file, display, problems)
    main = MainConfig() if text is None else Reader(problems).main_from_text(text, display)
    if problems:
        raise ConfigError(problems)
    return main


def load_units_from_text(text: str, file: str = "<string>", *, stem: str | None = None) -> tuple[Unit, ...]:
    """Parse the units of one unit file's text (``stem`` names a lone unit without ``name``).

    Raises:
        ConfigError: with every problem, located in ``file``.
    """
    problems: list[Problem] = []
    reader = Reader(problems)
    units = reader.units_from_text(text, file, stem if stem is not None else _stem(file))
    reader.check_across_units(units)
    if problems:
        raise ConfigError(problems)
    return tuple(units)


def parse_main(text: str, file: str = MAIN_CONFIG_NAME) -> MainConfig:
    """Parse the main config's text (``include``, ``control``, ``log``).

    Raises:
        ConfigError: with every problem, located in ``file``.
    """
    problems: list[Problem] = []
    main = Reader(problems).main_from_text(text, file)
    if problems:
        raise ConfigError(problems)
    return main


def describe_unit(unit: Unit) -> str:
    """A one-line summary for ``sockvisor check``: mode, listeners and command."""
    mode = unit.mode.value
    if unit.mode is Mode.POOL:
        mode = f"pool of {unit.workers} worker{'s' if unit.workers != 1 else ''}"
    count = len(unit.listen)
    listeners = ", ".join(listen.display for listen in unit.listen)
    if unit.mode is Mode.PROXY:
        mode = f"proxy to {unit.backend}" if unit.backend is not None else "proxy"
    runs = f"exec {shlex.join(unit.process.exec)}" if unit.process.exec else "forwarding only (no exec)"
    line = f"{unit.name}: {mode}, {count} listener{'s' if count != 1 else ''} ({listeners}), {runs}"
    return line if unit.enabled else f"{line} (disabled)"


# ----------------------------------------------------------------------------
# Files


def _locate(source: str) -> tuple[str, str | None]:
    """The config directory and the main config file (None: none, use defaults) of a config path."""
    if os.path.isdir(source):
        candidate = os.path.join(source, MAIN_CONFIG_NAME)
        return source, candidate if os.path.isfile(candidate) else None
    if os.path.exists(source):
        return os.path.dirname(source) or ".", source
    raise ConfigError([Problem(Location(source), "", "no such file or directory")])


def _display(file: str, base: str) -> str:
    """``file`` relative to the config directory when it is under it."""
    absolute, root = os.path.abspath(file), os.path.abspath(base)
    if absolute.startswith(root.rstrip(os.sep) + os.sep):
        return os.path.relpath(absolute, root)
    return file


def _stem(file: str) -> str:
    name = os.path.basename(file)
    stem, _ = os.path.splitext(name)
    return stem


def _read(file: str, display: str, problems: list[Problem]) -> str | None:
    try:
        with open(file, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        problems.append(Problem(Location(display), "", f"cannot read: {exc.strerror}"))
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = location_of_prefix(display, data[: exc.start].decode("utf-8", "replace"))
        problems.append(Problem(where, "", f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"))
        return None


def _unit_files(base: str, include: tuple[str, ...], exclude: str | None = None) -> list[str]:
    """Files matched by the include globs, each glob sorted, each file once, never the main config."""
    seen: set[str] = {os.path.realpath(exclude)} if exclude else set()
    files: list[str] = []
    for pattern in include:
        full = pattern if os.path.isabs(pattern) else os.path.join(glob.escape(base), pattern)
        for file in sorted(glob.glob(full, recursive=True)):
            key = os.path.realpath(file)
            if os.path.isfile(file) and key not in seen:
                seen.add(key)
                files.append(file)
    return files
