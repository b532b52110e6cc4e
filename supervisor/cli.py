"""The ``sockvisor`` command: the only place errors become messages and exit codes.

Exit status (SPEC section 1): 0 success; 1 runtime failure (cannot bind,
control socket unreachable, unit unknown); 2 usage or configuration error.
Every error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from supervisor.errors import BindError, ConfigError, ControlError, SockvisorError, UsageError
from supervisor.status import UnitStatus

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sockvisor", description="Socket-activation supervisor.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", metavar="PATH", help="config file or directory (default /etc/sockvisor)")

    def with_control(sp: argparse.ArgumentParser) -> None:
        with_config(sp)
        sp.add_argument("--control", metavar="PATH", help="control socket (default: from the config)")

    run = sub.add_parser("run", help="run the daemon")
    with_config(run)
    run.add_argument("--log-format", choices=["json", "console"])
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    check = sub.add_parser("check", help="validate the configuration; nothing is bound")
    with_config(check)
    status = sub.add_parser("status", help="show units")
    status.add_argument("name", nargs="?")
    status.add_argument("--json", action="store_true")
    with_control(status)
    for cmd in ("start", "stop", "restart"):
        sp = sub.add_parser(cmd, help=f"{cmd} a unit")
        sp.add_argument("name")
        with_control(sp)
    reload = sub.add_parser("reload", help="re-read the configuration (same as SIGHUP)")
    with_control(reload)
    reexec = sub.add_parser("reexec", help="re-execute the installed daemon in place: same pid, sockets and children")
    with_control(reexec)
    sub.add_parser("activate", help="bind addresses and run a command with the fds (see `sockvisor activate -h`)",
                   add_help=False)
    sub.add_parser("fds", help="inside a service: describe the inherited fds", add_help=False)
    imp = sub.add_parser("import", help="translate xinetd or systemd socket configurations into units")
    imp.add_argument("source", choices=["xinetd", "systemd"])
    imp.add_argument("paths", nargs="*", metavar="PATH",
                     help="xinetd: config files (default /etc/xinetd.conf); systemd: .socket files or directories")
    imp.add_argument("-o", "--output", metavar="DIR", help="write one NAME.yaml per unit into DIR (default: stdout)")
    imp.add_argument("--force", action="store_true", help="with --output: replace existing files")
    imp.add_argument("--strict", action="store_true", help="exit 2 when any setting was not carried over")
    imp.add_argument("--services", metavar="FILE", default="/etc/services",
                     help="xinetd: the services file that maps names to ports (default /etc/services)")
    return p


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    # activate and fds parse their own flags (activate's follow systemd-socket-activate).
    if args_list and args_list[0] == "activate":
        from supervisor import activate

        return activate.main(args_list[1:])
    if args_list and args_list[0] == "fds":
        from supervisor import fdsinfo

        return fdsinfo.main(args_list[1:])
    try:
        args = _parser().parse_args(args_list)
        return _dispatch(args, env)
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except BindError as exc:
        # A located bind failure reads like a config problem: the file's line first.
        if exc.location is not None:
            print(exc, file=sys.stderr)
        else:
            _err(str(exc))
        return EXIT_FAILURE
    except ControlError as exc:
        _err(str(exc))
        return EXIT_FAILURE
    except SockvisorError as exc:
        _err(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _err(message: str) -> None:
    print(f"sockvisor: {message}", file=sys.stderr)


def _dispatch(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from supervisor import config as configuration

    cmd = args.command
    if cmd == "check":
        cfg = configuration.load_config(args.config, environ=env)
        for unit in cfg.units:
            print(configuration.describe_unit(unit))
        print(f"ok: {len(cfg.units)} unit(s)")
        return EXIT_OK
    if cmd == "run":
        return _run(args, env)
    if cmd == "import":
        return _import(args)
    path = args.control or _control_path(args.config, env)
    from supervisor import control

    if cmd == "reload":
        reply = control.request(path, {"cmd": "reload"})
        if not reply.get("ok"):
            for line in reply.get("errors") or [reply.get("error", "reload failed")]:
                print(line, file=sys.stderr)
            return EXIT_USAGE if reply.get("reason") == "invalid_config" else EXIT_FAILURE
        print(f"reloaded: added {_names(reply.get('added'))}, changed {_names(reply.get('changed'))}, "
              f"removed {_names(reply.get('removed'))}")
        return EXIT_OK
    if cmd == "reexec":
        reply = control.request(path, {"cmd": "reexec"}, timeout=120)
        if not reply.get("ok"):
            _err(str(reply.get("error", "re-exec failed")))
            return EXIT_FAILURE
        print(f"re-executed: pid {reply.get('pid')}, version {reply.get('version')}, re-exec {reply.get('reexecs')}")
        return EXIT_OK
    if cmd == "status":
        req: dict[str, str | None] = {"cmd": "status"}
        if args.name:
            req["unit"] = args.name
        reply = control.request(path, req)
        if not reply.get("ok"):
            _err(str(reply.get("error")))
            return EXIT_FAILURE
        if args.json:
            out: dict[str, object] = {"units": reply["units"]}
            if "daemon" in reply:
                out["daemon"] = reply["daemon"]  # everything the metrics carry (SPEC 11)
            print(json.dumps(out, indent=2))
        else:
            print(format_status(reply["units"]))
        return EXIT_OK
    reply = control.request(path, {"cmd": cmd, "unit": args.name})
    if not reply.get("ok"):
        _err(str(reply.get("error")))
        return EXIT_FAILURE
    status = reply.get("unit")
    print(f"{args.name}: {status['state'] if status else 'ok'}")
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    """``sockvisor import`` (SPEC 9): units on stdout or in ``--output``, warnings on stderr."""
    from supervisor import importing
    from supervisor.importing import systemd, xinetd

    try:
        if args.source == "xinetd":
            result = xinetd.import_xinetd(args.paths or ["/etc/xinetd.conf"], services_file=args.services)
        else:
            if not args.paths:
                raise UsageError("sockvisor import systemd: name at least one .socket file or directory")
            result = systemd.import_systemd(args.paths)
    except importing.ImportSyntaxError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except importing.ImportReadError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILURE
    except (ValueError, LookupError, TypeError, RecursionError) as exc:  # a parser bug: still one line, exit 2
        _err(f"import {args.source}: cannot translate this input ({type(exc).__name__}: {exc}); please report it")
        return EXIT_USAGE
    documents = [(unit.name, importing.render_yaml(unit)) for unit in result.units]
    if args.output is None:
        sys.stdout.write("".join(("---\n" if i else "") + text for i, (_, text) in enumerate(documents)))
        sys.stdout.flush()
    else:
        _write_units(args.output, documents, args.force)
    for dropped in result.dropped:
        print(dropped, file=sys.stderr)
    if not result.units:
        print(f"sockvisor import {args.source}: no services found", file=sys.stderr)
    return EXIT_USAGE if args.strict and result.dropped else EXIT_OK


def _write_units(directory: str, documents: list[tuple[str, str]], force: bool) -> None:
    """One ``NAME.yaml`` per unit in ``directory``; nothing is written if any name is taken (without force).

    Files are created with O_EXCL|O_NOFOLLOW, or with ``force`` written beside and renamed over the old
    one, so a symlink planted at NAME.yaml is never followed.
    """
    targets = []
    for name, text in documents:
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise SockvisorError(f"cannot name a file after the unit {name!r}")
        targets.append((os.path.join(directory, name + ".yaml"), text))
    try:
        os.makedirs(directory, exist_ok=True)
        if not force:
            taken = [path for path, _ in targets if os.path.lexists(path)]
            if taken:
                raise SockvisorError(f"{taken[0]}: exists (use --force to replace it)")
        for path, text in targets:
            if force:
                temporary = f"{path}.{os.getpid()}.tmp"
                _create(temporary, text)
                os.rename(temporary, path)
            else:
                _create(path, text)
    except OSError as exc:
        raise SockvisorError(f"{exc.filename or directory}: cannot write: {exc.strerror}") from exc


def _create(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def _names(names: Any) -> str:
    return ", ".join(names) if names else "none"


def _control_path(config_path: str | None, env: Mapping[str, str]) -> str:
    """The control socket named by the main config (units are not read: a broken unit must not block status)."""
    from supervisor import config as configuration

    main = configuration.load_main(config_path, environ=env)
    return main.control_socket


def format_status(units: list[UnitStatus]) -> str:
    """A readable table: name, mode, state, listen, pids, connections, restarts, last exit, status."""
    header = ("UNIT", "MODE", "STATE", "LISTEN", "PIDS", "ACTIVE", "ACCEPTED", "REFUSED", "RESTARTS", "LAST EXIT",
              "STATUS")
    rows = [header]
    for u in units:
        conns = u.get("connections") or {}
        pids = u.get("pids") or []
        last = u.get("last_exit")
        rows.append((
            str(u["name"]), str(u["mode"]), str(u["state"]), ",".join(u.get("listen") or []) or "-",
            (",".join(str(p) for p in pids[:4]) + ("..." if len(pids) > 4 else "")) or "-",
            str(conns.get("active", 0)), str(conns.get("accepted", 0)), str(conns.get("refused", 0)),
            str(u.get("restarts", 0)),
            f"{last['status']} (pid {last['pid']})" if last else "-",
            u.get("status") or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    return table + "".join(_policy_details(u) + _pool_details(u) for u in units)


def _policy_details(unit: UnitStatus) -> str:
    """Refusals by reason and a pause in force (accept mode), when there is something to say."""
    lines = []
    by_reason = unit.get("connections", {}).get("refused_by_reason") or {}
    if by_reason:
        lines.append(f"\n{unit['name']} refused: "
                     + ", ".join(f"{reason} {count}" for reason, count in sorted(by_reason.items())))
    if unit.get("paused"):
        lines.append(f"\n{unit['name']} accepting paused: {unit['paused']}")
    return "".join(lines)


def _pool_details(unit: UnitStatus) -> str:
    """Per-worker lines (slot, pid, state, age, restarts) and the rolling restart, for pool units."""
    workers = unit.get("workers")
    if not workers:
        return ""
    lines = [f"\n{unit['name']} workers:"]
    for w in workers:
        age = w.get("age")
        lines.append(f"  slot {w.get('slot')}: pid {w.get('pid') or '-'} {w.get('state')}"
                     f" age {age if age is not None else '-'}s restarts {w.get('restarts', 0)}"
                     + (f" ({w['role']})" if w.get("role") not in (None, "worker") else ""))
    roll = unit.get("roll")
    if roll:
        lines.append(f"  roll: {roll.get('state')} {roll.get('replaced', 0)}/{roll.get('total', 0)}"
                     + (f" ({roll['reason']})" if roll.get("reason") else ""))
    return "\n".join(lines)


def _run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    import asyncio
    import signal

    import uvloop

    from supervisor import config as configuration
    from supervisor import log
    from supervisor.daemon import Daemon
    from supervisor.model import LogFormat

    cfg = configuration.load_config(args.config, environ=env)
    fmt = LogFormat(args.log_format) if args.log_format else cfg.main.log_format
    writer = log.LogWriter(sys.stderr.fileno())  # children share fd 2; the daemon never blocks on it
    log.configure(fmt, args.log_level or cfg.main.log_level, writer=writer,
                  priorities=log.under_journal(env, sys.stderr.fileno()))
    config_path = args.config or env.get("SOCKVISOR_CONFIG") or None

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        writer.attach(loop)
        try:
            daemon = Daemon(cfg, environ=env, config_path=config_path, log_writer=writer)
            stop = asyncio.Event()
            # Signals only post: SIGTERM/SIGINT complete the daemon's shutdown, SIGHUP asks for a reload.
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
            loop.add_signal_handler(signal.SIGUSR2, daemon.request_reexec)
            # A re-exec blocks these across execve; pending ones are delivered now that they are handled.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2})
            try:
                await daemon.run(shutdown=stop.wait())
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
                    loop.remove_signal_handler(sig)
        finally:
            writer.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
