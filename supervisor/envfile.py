"""``environment_files``: ``KEY=VALUE`` files read as systemd's ``EnvironmentFile=`` reads them.

The rules (systemd.exec(5), ``EnvironmentFile=``): one assignment per line;
empty lines and lines starting with ``#`` or ``;`` are comments; whitespace
around the name and before the value is dropped; a value in double quotes may
hold ``\\"``, ``\\\\``, ``\\$``, ``\\```, and a backslash-newline joins lines; a
value in single quotes is taken literally (it may span lines); an unquoted
value loses its trailing whitespace, a backslash escapes the next character,
and a backslash at the end of the line continues it on the next. Where systemd
skips a malformed line with a warning, sockvisor reports it with its line (the
configuration is refused, so nothing is half-applied).
"""

from __future__ import annotations

import re

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DQ_ESCAPES = {'"': '"', "\\": "\\", "$": "$", "`": "`"}


class EnvFileError(ValueError):
    """A malformed line: ``line`` is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


def parse(text: str) -> list[tuple[str, str]]:
    """The assignments in ``text``, in order (a later one for the same name wins when applied)."""
    out: list[tuple[str, str]] = []
    i, n, line = 0, len(text), 1
    while i < n:
        # skip blank space between assignments
        while i < n and text[i] in " \t\r\n":
            if text[i] == "\n":
                line += 1
            i += 1
        if i >= n:
            break
        start_line = line
        if text[i] in "#;":
            while i < n and text[i] != "\n":
                i += 1
            continue
        eq = text.find("=", i)
        nl = text.find("\n", i)
        if eq < 0 or (0 <= nl < eq):
            end = n if nl < 0 else nl
            raise EnvFileError(start_line, f"expected NAME=value, got {text[i:end].strip()[:60]!r}")
        name = text[i:eq].strip()
        if not NAME.fullmatch(name):
            raise EnvFileError(start_line, f"invalid variable name {name[:60]!r}")
        i = eq + 1
        while i < n and text[i] in " \t":
            i += 1
        value: list[str] = []
        if i < n and text[i] == '"':
            i += 1
            while True:
                if i >= n:
                    raise EnvFileError(start_line, f"{name}: unterminated double quote")
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n:
                    nxt = text[i + 1]
                    if nxt == "\n":
                        line += 1
                        i += 2
                        continue
                    if nxt in _DQ_ESCAPES:
                        value.append(_DQ_ESCAPES[nxt])
                        i += 2
                        continue
                if c == "\n":
                    line += 1
                value.append(c)
                i += 1
            _rest_of_line(text, i, name, start_line)
        elif i < n and text[i] == "'":
            close = text.find("'", i + 1)
            if close < 0:
                raise EnvFileError(start_line, f"{name}: unterminated single quote")
            chunk = text[i + 1:close]
            line += chunk.count("\n")
            value.append(chunk)
            i = close + 1
            _rest_of_line(text, i, name, start_line)
        else:
            while i < n and text[i] != "\n":
                c = text[i]
                if c == "\\" and i + 1 < n:
                    if text[i + 1] == "\n":
                        line += 1
                    else:
                        value.append(text[i + 1])
                    i += 2
                    continue
                value.append(c)
                i += 1
            joined = "".join(value).rstrip(" \t\r")
            value = [joined]
        while i < n and text[i] != "\n":
            i += 1
        out.append((name, "".join(value)))
    return out


def _rest_of_line(text: str, i: int, name: str, line: int) -> None:
    end = text.find("\n", i)
    rest = text[i:] if end < 0 else text[i:end]
    if rest.strip(" \t\r"):
        raise EnvFileError(line, f"{name}: unexpected text after the closing quote: {rest.strip()[:40]!r}")
