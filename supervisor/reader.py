"""The reader: walks located YAML documents against the schema and builds the frozen model.

Every check appends a ``Problem`` (location, key path, message) to one list
and carries on with a default, so one pass reports every problem, never only
the first (see ``supervisor.config`` for the whole flow).
"""

from __future__ import annotations

import shlex
import signal
import socket
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from supervisor import addresses, schema, values
from supervisor.errors import Location, Problem
from supervisor.model import (
    RESERVED_ENVIRONMENT,
    Builtin,
    FileRef,
    InetAddress,
    Listen,
    ListenKind,
    LogFormat,
    MainConfig,
    Mode,
    Pass,
    Process,
    ProxyProtocol,
    Rate,
    Ready,
    Restart,
    Start,
    StartLimit,
    Stderr,
    Unit,
)
from supervisor.yamlload import (
    Map,
    Scalar,
    Seq,
    Value,
    child_path,
    compose,
    is_empty_document,
    kind_of,
)

T = TypeVar("T")
NETWORK = schema.plain_value(addresses.parse_network)

# ----------------------------------------------------------------------------
# The reader


class Reader:
    """Walks located YAML values against the schema, appending to ``problems``."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        # Scalars the YAML layer could not resolve: already reported once, not again as "got null".
        self._broken: set[Location | None] = set()

    def problem(self, location: Location | None, path: str, message: str) -> None:
        if location in self._broken:
            return
        self.problems.append(Problem(location, path, message))

    def unit_key(self, doc: Map, key: str, convert: Callable[[Value], T]) -> T:
        """The converted value of the unit key ``key``, or the model's default for it."""
        default: T = schema.UNIT_DEFAULTS[key]
        return self.get(doc, key, "", convert, default)

    def get(self, mapping: Map, key: str, path: str, convert: Callable[[Value], T], default: T) -> T:
        """The converted value of ``key``, or ``default`` if absent or invalid (then a problem)."""
        entry = mapping.entries.get(key)
        if entry is None:
            return default
        try:
            return convert(entry.value)
        except ValueError as exc:
            self.problem(entry.value.location, child_path(path, key), str(exc))
            return default

    def check_keys(
        self, mapping: Map, path: str, known: Collection[str], misplaced: Mapping[str, str] | None = None
    ) -> None:
        """One problem per key not in ``known``, with a hint where one helps."""
        for key, entry in mapping.entries.items():
            if key in known:
                continue
            message = (misplaced[key] if misplaced and key in misplaced
                       else "unknown key" + schema.did_you_mean(key, known))
            self.problem(entry.key_location, child_path(path, key), message)

    def mapping(self, value: Value, path: str, what: str) -> Map | None:
        if isinstance(value, Map):
            return value
        self.problem(value.location, path, f"expected {what}, got {kind_of(value)}")
        return None

    def sequence(self, mapping: Map, key: str, path: str, what: str) -> Seq | None:
        value = mapping.get(key)
        if value is None:
            return None
        if isinstance(value, Seq):
            return value
        self.problem(value.location, child_path(path, key), f"expected a list of {what}, got {kind_of(value)}")
        return None

    def each(self, seq: Seq | None, path: str, convert: Callable[[Value], T]) -> tuple[T, ...]:
        """Every item of ``seq`` converted; invalid items are problems and are left out."""
        if seq is None:
            return ()
        result: list[T] = []
        for index, item in enumerate(seq.items):
            try:
                result.append(convert(item))
            except ValueError as exc:
                self.problem(item.location, child_path(path, index), str(exc))
        return tuple(result)

    # -- documents ------------------------------------------------------------

    def _documents(self, text: str, file: str) -> list[Value]:
        documents, problems = compose(text, file)
        self.problems.extend(problems)
        self._broken.update(p.location for p in problems if p.message.startswith("invalid value:"))
        return [doc for doc in documents if not is_empty_document(doc)]

    def main_from_text(self, text: str, file: str) -> MainConfig:
        documents = self._documents(text, file)
        if not documents:
            return MainConfig()  # an empty main config means all defaults
        for extra in documents[1:]:
            self.problem(extra.location, "", "the main config holds one mapping, not several documents")
        doc = self.mapping(documents[0], "", "a mapping")
        return MainConfig() if doc is None else self.main(doc)

    def units_from_text(self, text: str, file: str, stem: str) -> list[Unit]:
        before = len(self.problems)
        documents = self._documents(text, file)
        if not documents:
            if len(self.problems) == before:
                self.problem(Location(file, 1, 1), "", "file is empty: expected a unit mapping")
            return []
        units: list[Unit] = []
        for doc in documents:
            mapping = self.mapping(doc, "", "a unit mapping")
            if mapping is not None:
                units.append(self.unit(mapping, stem if len(documents) == 1 else None))
        # Report in reading order, whatever order the checks ran in.
        self.problems[before:] = sorted(self.problems[before:], key=reading_order)
        return units

    # -- main config ----------------------------------------------------------

    def main(self, doc: Map) -> MainConfig:
        self.check_keys(doc, "", ("include", "control", "log", "metrics", "subreaper", "cgroups"))
        include: tuple[str, ...] = schema.DEFAULT_INCLUDE
        if "include" in doc.entries:
            include = self.each(self.sequence(doc, "include", "", "glob patterns"), "include", schema.nonempty_string)
        control_socket = MainConfig().control_socket
        control_mode = MainConfig().control_mode
        control = doc.get("control")
        if control is not None and (mapping := self.mapping(control, "control", "a mapping")) is not None:
            self.check_keys(mapping, "control", ("socket", "mode"))
            control_socket = self.get(mapping, "socket", "control", schema.plain_value(addresses.parse_unix_path),
                                      control_socket)
            control_mode = self.get(mapping, "mode", "control", schema.mode_value("mode"), control_mode)
        log_format: LogFormat | None = None
        log_level = MainConfig().log_level
        log = doc.get("log")
        if log is not None and (mapping := self.mapping(log, "log", "a mapping")) is not None:
            self.check_keys(mapping, "log", ("format", "level"))
            log_format = self.get(mapping, "format", "log", schema.enum_value(LogFormat), None)
            log_level = self.get(mapping, "level", "log", schema.log_level, log_level)
        metrics_listen: InetAddress | str | None = None
        metrics = doc.get("metrics")
        if metrics is not None and (mapping := self.mapping(metrics, "metrics", "a mapping")) is not None:
            self.check_keys(mapping, "metrics", ("listen",))
            metrics_listen = self.get(mapping, "listen", "metrics", schema.plain_value(_metrics_address), None)
        return MainConfig(
            include=include,
            control_socket=control_socket,
            control_mode=control_mode,
            log_format=log_format,
            log_level=log_level,
            metrics_listen=metrics_listen,
            subreaper=self.get(doc, "subreaper", "", schema.bool_value, False),
            cgroups=self.get(doc, "cgroups", "", schema.bool_value, True),
        )

    # -- units ----------------------------------------------------------------

    def unit(self, doc: Map, stem: str | None) -> Unit:
        """One unit document; ``stem`` is the default name (None: the name is required)."""
        listen_hint = {key: "is a listen option; put it under a listen entry" for key in schema.LISTEN_OPTIONS}
        listen_hint.update({kind: "is a listen kind; write it as an entry under listen:" for kind in schema.KIND_KEYS})
        self.check_keys(doc, "", schema.UNIT_KEYS, listen_hint)

        name, location = self._unit_name(doc, stem)
        mode_entry = doc.entries.get("mode")
        mode = self.unit_key(doc, "mode", schema.enum_value(Mode))
        mode_known = mode_entry is None or (
            isinstance(mode_entry.value, Scalar) and mode_entry.value.value in {m.value for m in Mode}
        )

        listen = self._listens(doc, name, mode if mode_known else None)
        process = self._process(doc, mode if mode_known else None)
        backend = self.get(doc, "backend", "", schema.backend_address, None)
        builtin = self.get(doc, "builtin", "", schema.enum_value(Builtin), None)

        default_pass = Pass.STDIO if mode is Mode.ACCEPT else schema.UNIT_DEFAULTS["pass_"]
        pass_ = self.get(doc, "pass", "", schema.enum_value(Pass), default_pass)
        if mode_known:
            self._check_mode_keys(doc, mode)
            self._check_pass(doc, mode, pass_, len(listen))
            self._check_proxy(doc, mode, backend, listen)
            self._check_builtin(doc, mode, builtin, listen)

        restart_delay = self.unit_key(doc, "restart_delay", schema.duration(positive=True))
        restart_delay_max = self.unit_key(doc, "restart_delay_max", schema.duration(positive=True))
        if "restart_delay_max" in doc.entries and restart_delay_max < restart_delay:
            self.problem(
                doc.entries["restart_delay_max"].value.location,
                "restart_delay_max",
                f"must be at least restart_delay ({restart_delay:g}s)",
            )

        return Unit(
            name=name,
            listen=listen,
            process=process,
            mode=mode,
            description=self.unit_key(doc, "description", schema.string_value),
            enabled=self.unit_key(doc, "enabled", schema.bool_value),
            pass_=pass_,
            start=self.unit_key(doc, "start", schema.enum_value(Start)),
            restart=self.unit_key(doc, "restart", schema.enum_value(Restart)),
            restart_delay=restart_delay,
            restart_delay_max=restart_delay_max,
            restart_reset=self.unit_key(doc, "restart_reset", schema.duration()),
            start_limit=self._start_limit(doc),
            ready=self.unit_key(doc, "ready", schema.enum_value(Ready)),
            start_timeout=self.unit_key(doc, "start_timeout", schema.duration(positive=True)),
            watchdog=self.unit_key(doc, "watchdog", schema.duration(positive=True)),
            fd_store_max=self.unit_key(doc, "fd_store_max", schema.int_value(0, 2**16)),
            max_connections=self.unit_key(doc, "max_connections", schema.int_value(1, schema.INT_MAX)),
            max_connections_per_source=self.unit_key(doc, "max_connections_per_source",
                                                     schema.int_value(1, schema.INT_MAX)),
            rate=self._rate(doc),
            allow=self.each(self.sequence(doc, "allow", "", "addresses"), "allow", NETWORK),
            deny=self.each(self.sequence(doc, "deny", "", "addresses"), "deny", NETWORK),
            log_connections=self.unit_key(doc, "log_connections", schema.bool_value),
            workers=self.unit_key(doc, "workers", schema.int_value(1, schema.MAX_WORKERS)),
            settle=self.unit_key(doc, "settle", schema.duration()),
            max_surge=self.unit_key(doc, "max_surge", schema.int_value(1, schema.MAX_WORKERS)),
            banner=self._file(doc, "banner"),
            banner_success=self._file(doc, "banner_success"),
            banner_fail=self._file(doc, "banner_fail"),
            access_times=self.each(self.sequence(doc, "access_times", "", "time windows"), "access_times",
                                   schema.access_window),
            builtin=builtin,
            backend=backend,
            idle_stop=self.unit_key(doc, "idle_stop", schema.duration(positive=True)),
            proxy_protocol=self.unit_key(doc, "proxy_protocol", schema.enum_value(ProxyProtocol)),
            udp_idle=self.unit_key(doc, "udp_idle", schema.duration(positive=True)),
            location=location,
        )

    def _unit_name(self, doc: Map, stem: str | None) -> tuple[str, Location]:
        entry = doc.entries.get("name")
        if entry is not None:
            try:
                name = schema.scalar_text(entry.value, "a unit name")
            except ValueError as exc:
                self.problem(entry.value.location, "name", str(exc))
                return "invalid", entry.value.location
            if not schema.UNIT_NAME.fullmatch(name):
                self.problem(
                    entry.value.location, "name", f"invalid unit name {name!r}: use 1-64 of A-Z a-z 0-9 _ . @ -"
                )
            return name, entry.value.location
        if stem is None:
            self.problem(doc.location, "name", "missing: a file with several units needs a name in each")
            return "unnamed", doc.location
        if not schema.UNIT_NAME.fullmatch(stem):
            self.problem(
                doc.location,
                "name",
                f"the file name gives the invalid unit name {stem!r}: add a name (1-64 of A-Z a-z 0-9 _ . @ -)",
            )
        return stem, doc.location

    def _check_mode_keys(self, doc: Map, mode: Mode) -> None:
        for key, modes in schema.KEY_MODES.items():
            entry = doc.entries.get(key)
            if entry is None or mode in modes:
                continue
            names = [m.value for m in Mode if m in modes]
            owners = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
            self.problem(entry.key_location, key, f"only applies to mode: {owners} (this unit is mode: {mode.value})")

    def _file(self, doc: Map, key: str) -> FileRef | None:
        entry = doc.entries.get(key)
        if entry is None:
            return None
        try:
            return FileRef(schema.absolute_path(entry.value), location=entry.value.location)
        except ValueError as exc:
            self.problem(entry.value.location, key, str(exc))
            return None

    def _environment_files(self, doc: Map) -> tuple[FileRef, ...]:
        seq = self.sequence(doc, "environment_files", "", "paths (a leading - makes one optional)")
        if seq is None:
            return ()
        refs = []
        for index, item in enumerate(seq.items):
            path = child_path("environment_files", index)
            try:
                text = schema.string_value(item)
                optional = text.startswith("-")
                name = text[1:] if optional else text
                if not name.startswith("/"):
                    raise ValueError(f"expected an absolute path (optionally after -), got {text!r}")
            except ValueError as exc:
                self.problem(item.location, path, str(exc))
                continue
            refs.append(FileRef(name, optional=optional, location=item.location))
        return tuple(refs)

    def _check_builtin(self, doc: Map, mode: Mode, builtin: Builtin | None, listen: tuple[Listen, ...]) -> None:
        """builtin replaces exec: stream listeners in mode: accept, datagram listeners in mode: service."""
        entry = doc.entries.get("builtin")
        if entry is None or builtin is None:
            return
        if "exec" in doc.entries:
            self.problem(doc.entries["exec"].key_location, "exec", "a unit has either exec or builtin, not both")
        if mode is Mode.SERVICE:
            for index, item in enumerate(listen):
                if item.kind not in (ListenKind.UDP, ListenKind.UNIX_DGRAM):
                    self.problem(item.location, child_path(child_path("listen", index), item.kind.value),
                                 "a builtin in mode: service answers datagrams (udp, unix-dgram); "
                                 f"for {item.kind.value} use mode: accept")

    def _check_proxy(self, doc: Map, mode: Mode, backend: InetAddress | str | None, listen: tuple[Listen, ...]) -> None:
        """mode: proxy: every listen entry has a backend it can forward to; other modes name none."""
        for index, entry in enumerate(listen):
            path = child_path(child_path("listen", index), "backend")
            if mode is not Mode.PROXY:
                if entry.backend is not None:
                    self.problem(entry.location, path, f"only applies to mode: proxy (this unit is mode: {mode.value})")
                continue
            kind_path = child_path(child_path("listen", index), entry.kind.value)
            if entry.kind not in (ListenKind.TCP, ListenKind.UDP, ListenKind.UNIX):
                self.problem(entry.location, kind_path,
                             f"mode: proxy forwards tcp, udp and unix (stream) listeners, not {entry.kind.value}")
                continue
            target = entry.backend if entry.backend is not None else backend
            if target is None:
                self.problem(entry.location, path, "missing: mode: proxy needs a backend (on the unit or this entry)")
            elif entry.kind is ListenKind.UDP and not isinstance(target, InetAddress):
                self.problem(entry.location, path, "a udp listener forwards to a host:port backend, not a unix path")

    def _check_pass(self, doc: Map, mode: Mode, pass_: Pass, listeners: int) -> None:
        entry = doc.entries.get("pass")
        if entry is None or pass_ is not Pass.STDIO:
            return
        if mode is Mode.POOL:
            self.problem(
                entry.value.location, "pass", "must be fds in mode: pool (each worker gets every listening fd)"
            )
        elif mode is Mode.SERVICE and listeners != 1:
            self.problem(
                entry.value.location,
                "pass",
                f"stdio needs exactly one listen entry in mode: service (this unit has {listeners})",
            )

    def _start_limit(self, doc: Map) -> StartLimit | None:
        value = doc.get("start_limit")
        if value is None or (mapping := self.mapping(value, "start_limit", "a mapping {burst, interval}")) is None:
            return None
        self.check_keys(mapping, "start_limit", ("burst", "interval"))
        ok = self._require(mapping, "start_limit", ("burst", "interval"))
        burst = self.get(mapping, "burst", "start_limit", schema.int_value(1, schema.INT_MAX), 0)
        interval = self.get(mapping, "interval", "start_limit", schema.duration(positive=True), 0.0)
        return StartLimit(burst, interval) if ok and burst and interval else None

    def _rate(self, doc: Map) -> Rate | None:
        value = doc.get("rate")
        if value is None or (mapping := self.mapping(value, "rate", "a mapping {per_second, burst}")) is None:
            return None
        self.check_keys(mapping, "rate", ("per_second", "burst"))
        if not self._require(mapping, "rate", ("per_second",)):
            return None
        per_second = self.get(mapping, "per_second", "rate", schema.plain_value(schema.positive_number), 0.0)
        # Without a burst, allow one second's worth of connections at once.
        one_second = max(1, int(per_second + 0.999999))
        burst = self.get(mapping, "burst", "rate", schema.int_value(1, schema.INT_MAX), one_second)
        return Rate(per_second, burst) if per_second else None

    def _require(self, mapping: Map, path: str, keys: tuple[str, ...]) -> bool:
        missing = [key for key in keys if key not in mapping.entries]
        for key in missing:
            self.problem(mapping.location, child_path(path, key), "missing")
        return not missing

    # -- listen ---------------------------------------------------------------

    def _listens(self, doc: Map, unit_name: str, mode: Mode | None) -> tuple[Listen, ...]:
        entry = doc.entries.get("listen")
        if entry is None:
            self.problem(doc.location, "listen", "missing: a unit needs at least one listen entry")
            return ()
        seq = self.sequence(doc, "listen", "", "listen entries")
        if seq is None:
            return ()
        if not seq.items:
            self.problem(seq.location, "listen", "must hold at least one listen entry")
        result = []
        for index, item in enumerate(seq.items):
            listen = self._listen(item, child_path("listen", index), unit_name, mode)
            if listen is not None:
                result.append(listen)
        return tuple(result)

    def _listen(self, value: Value, path: str, unit_name: str, mode: Mode | None) -> Listen | None:
        entry = self.mapping(value, path, "a mapping like {tcp: 127.0.0.1:8080}")
        if entry is None:
            return None
        unit_keys = {key: "is a unit key, not a listen option"
                     for key in schema.UNIT_KEYS if key not in schema.LISTEN_OPTIONS}
        self.check_keys(entry, path, (*schema.KIND_KEYS, *schema.LISTEN_OPTIONS), unit_keys)
        kinds = [key for key in entry.entries if key in schema.KIND_KEYS]
        if not kinds:
            self.problem(entry.location, path, "needs one of " + ", ".join(schema.KIND_KEYS))
            return None
        for extra in kinds[1:]:
            self.problem(
                entry.entries[extra].key_location,
                child_path(path, extra),
                f"one kind per listen entry; this one already has {kinds[0]!r}",
            )
        kind = ListenKind(kinds[0])
        kind_entry = entry.entries[kinds[0]]
        kind_path = child_path(path, kinds[0])
        address: InetAddress | str
        try:
            address = schema.listen_address(kind, kind_entry.value)
        except ValueError as exc:
            self.problem(kind_entry.value.location, kind_path, str(exc))
            address = ""
        if mode is Mode.ACCEPT and kind.is_datagram:
            self.problem(
                kind_entry.value.location,
                kind_path,
                f"a {kind.value} listener has no connections to accept; use mode: service",
            )

        options: dict[str, Any] = {"name": unit_name}
        for key, option_entry in entry.entries.items():
            if key not in schema.LISTEN_OPTIONS:
                continue
            key_path = child_path(path, key)
            kinds_allowed = schema.LISTEN_OPTIONS[key]
            if kind not in kinds_allowed:
                self.problem(
                    option_entry.key_location,
                    key_path,
                    f"only applies to {schema.kind_group_name(kinds_allowed)} listeners, not {kind.value}",
                )
                continue
            if key in schema.FILESYSTEM_OPTIONS and isinstance(address, str) and address.startswith("@"):
                self.problem(option_entry.key_location, key_path, "has no effect on an abstract socket (@name)")
                continue
            if key == "ipv6_only" and isinstance(address, InetAddress) and address.family == socket.AF_INET:
                self.problem(option_entry.key_location, key_path, "only applies to IPv6 addresses")
                continue
            if key == "symlinks":
                seq = self.sequence(entry, key, path, "absolute paths")
                options[key] = self.each(seq, key_path, schema.absolute_path)
                continue
            option = schema.LISTEN_PARSERS[key]
            try:
                options[option.field] = option.convert(option_entry.value)
            except ValueError as exc:
                self.problem(option_entry.value.location, key_path, str(exc))
                continue
            if key == "protocol" and (options[key] == "udplite") != (kind is ListenKind.UDP):
                fits = "udp" if options[key] == "udplite" else "tcp"
                self.problem(option_entry.value.location, key_path,
                             f"{options[key]} is for {fits} listeners, not {kind.value}")
                del options[key]
        return Listen(kind=kind, address=address, location=entry.location, **options)

    # -- process --------------------------------------------------------------

    def _process(self, doc: Map, mode: Mode | None) -> Process:
        # A proxy without exec only forwards (to a backend someone else runs); a builtin runs nothing.
        nothing_to_run = mode is Mode.PROXY or "builtin" in doc.entries
        command = () if nothing_to_run and "exec" not in doc.entries else self._exec(doc)
        stderr = self.get(doc, "stderr", "", schema.enum_value(Stderr), Stderr.INHERIT)
        if stderr is Stderr.CONNECTION and mode is not None and mode is not Mode.ACCEPT:
            self.problem(
                doc.entries["stderr"].value.location,
                "stderr",
                f"connection only applies to mode: accept (this unit is mode: {mode.value})",
            )
        return Process(
            exec=command,
            user=self.get(doc, "user", "", schema.principal, None),
            group=self.get(doc, "group", "", schema.principal, None),
            supplementary_groups=self.each(
                self.sequence(doc, "supplementary_groups", "", "groups"), "supplementary_groups", schema.principal
            ),
            working_directory=self.get(doc, "working_directory", "", schema.absolute_path, None),
            environment=self._environment(doc),
            pass_environment=self.each(
                self.sequence(doc, "pass_environment", "", "variable names"), "pass_environment", schema.env_name
            ),
            environment_files=self._environment_files(doc),
            umask=self.get(doc, "umask", "", schema.mode_value("umask", 0o777), None),
            nice=self.get(doc, "nice", "", schema.int_value(-20, 19), None),
            limits=self._limits(doc),
            stderr=stderr,
            stop_signal=self.get(doc, "stop_signal", "", schema.plain_value(values.parse_signal), int(signal.SIGTERM)),
            stop_timeout=self.get(doc, "stop_timeout", "", schema.duration(), 10.0),
        )

    def _exec(self, doc: Map) -> tuple[str, ...]:
        entry = doc.entries.get("exec")
        if entry is None:
            self.problem(doc.location, "exec", "missing: a unit needs a command to run")
            return ()
        value = entry.value
        if isinstance(value, Scalar) and isinstance(value.value, str):
            try:
                argv = tuple(shlex.split(schema.clean(value.value)))
            except ValueError as exc:
                self.problem(value.location, "exec", f"cannot split the command: {exc}")
                return ()
        elif isinstance(value, Seq):
            argv = self.each(value, "exec", lambda item: schema.scalar_text(item, "a string"))
            if len(argv) != len(value.items):
                return ()
        else:
            self.problem(
                value.location, "exec", f"expected a list of strings or a command line, got {kind_of(value)}"
            )
            return ()
        if not argv or not argv[0]:
            self.problem(value.location, "exec", "must not be empty")
        return argv

    def _environment(self, doc: Map) -> tuple[tuple[str, str], ...]:
        value = doc.get("environment")
        if value is None or (mapping := self.mapping(value, "environment", "a mapping of NAME: value")) is None:
            return ()
        result = []
        for key, entry in mapping.entries.items():
            path = child_path("environment", key)
            if not schema.ENV_NAME.fullmatch(key):
                self.problem(
                    entry.key_location, path, "invalid variable name: use A-Z a-z 0-9 _ , not starting with a digit"
                )
                continue
            if key in RESERVED_ENVIRONMENT:
                self.problem(entry.key_location, path, "is set by sockvisor and cannot be overridden")
                continue
            item = entry.value
            if isinstance(item, Scalar) and isinstance(item.value, bool):
                self.problem(item.location, path, f'a boolean is ambiguous here; quote it: {key}: "{item.text}"')
                continue
            try:
                result.append((key, schema.scalar_text(item, "a string or a number")))
            except ValueError as exc:
                self.problem(item.location, path, str(exc))
        return tuple(result)

    def _limits(self, doc: Map) -> tuple[tuple[str, int, int], ...]:
        value = doc.get("limits")
        if value is None or (mapping := self.mapping(value, "limits", "a mapping of rlimit names")) is None:
            return ()
        self.check_keys(mapping, "limits", schema.LIMIT_NAMES)
        result = []
        for key, entry in mapping.entries.items():
            if key not in schema.LIMIT_NAMES:
                continue
            path = child_path("limits", key)
            if isinstance(entry.value, Map):
                pair = entry.value
                self.check_keys(pair, path, ("soft", "hard"))
                if not self._require(pair, path, ("soft", "hard")):
                    continue
                soft = self.get(pair, "soft", path, schema.plain_value(values.parse_rlimit_value), None)
                hard = self.get(pair, "hard", path, schema.plain_value(values.parse_rlimit_value), None)
                if soft is None or hard is None:
                    continue
                try:
                    values.check_rlimit_order(soft, hard)
                except ValueError as exc:
                    self.problem(pair.location, path, str(exc))
                    continue
                result.append((key, soft, hard))
                continue
            single = self.get(mapping, key, "limits", schema.plain_value(values.parse_rlimit_value), None)
            if single is not None:
                result.append((key, single, single))
        return tuple(result)

    # -- across units ---------------------------------------------------------

    def check_across_units(self, units: list[Unit]) -> None:
        """Unit names are unique; no two enabled listeners share an address."""
        names: dict[str, Unit] = {}
        for unit in units:
            first = names.get(unit.name)
            if first is None:
                names[unit.name] = unit
                continue
            self.problem(unit.location, "name", f"duplicate unit name {unit.name!r}; first defined at {first.location}")
        bound: dict[tuple[object, ...], tuple[Unit, Listen]] = {}
        for unit in units:
            if not unit.enabled:
                continue
            for index, listen in enumerate(unit.listen):
                key = _bind_key(listen)
                if key is None:
                    continue
                other = bound.get(key)
                if other is None:
                    bound[key] = (unit, listen)
                    continue
                if other[1].reuse_port and listen.reuse_port:
                    continue
                self.problem(
                    listen.location,
                    child_path(child_path("listen", index), listen.kind.value),
                    f"{listen.address} is already used by unit {other[0].name!r} at {other[1].location}",
                )


def _bind_key(listen: Listen) -> tuple[object, ...] | None:
    """What two listeners must not share: (kind, host, port) or the path of a node."""
    if isinstance(listen.address, InetAddress):
        return (listen.kind, listen.address.host, listen.address.port)
    if not listen.address:
        return None
    return ("path", listen.address)


def reading_order(problem: Problem) -> tuple[int, int]:
    location = problem.location
    return (0, 0) if location is None else (location.line, location.column)


def _metrics_address(value: object) -> InetAddress | str:
    """``metrics.listen``: host:port, [v6]:port, or a unix socket path (``/...``, ``@name``)."""
    if isinstance(value, str) and value.startswith(("/", "@")):
        return addresses.parse_unix_path(value)
    return addresses.parse_inet(value)
