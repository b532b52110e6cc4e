"""Fuzz the configuration loader with mutated unit files: no traceback, only located errors.

    python3 bench/fuzz_config.py                 # 100,000 inputs, seed 1
    python3 bench/fuzz_config.py -n 20000 --seed 7

Each input is a valid unit file (the shipped examples and a few hand-written
ones) mutated 1-4 times: a value replaced by a hostile one (huge numbers,
timestamps, tags, lists, aliases, control characters...), characters
inserted, deleted or flipped, lines duplicated or cut, nesting and alias
bombs spliced in. Every input is loaded with ``load_units_from_text``; an
exception other than ConfigError is a "traceback", an error line not shaped
``file:line:column: ...`` is a "bad line", an input slower than 1 s is "slow".
Prints the figure: inputs, tracebacks, bad lines, slow inputs, time.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from supervisor.config import load_units_from_text
from supervisor.errors import ConfigError

LOCATED = re.compile(r"[^\n:]+:\d+:\d+: [^\n]+")

SEEDS = [
    "listen: [{tcp: 127.0.0.1:8080, backlog: 128, receive_buffer: 64K, mark: 7}]\nexec: [/bin/true]\n",
    "name: web\nmode: accept\nlisten:\n  - tcp: 8080\n    keepalive_time: 30s\nexec: /bin/cat\n"
    "rate: {per_second: 10, burst: 20}\nmax_connections: 10\nallow: [127.0.0.0/8]\n",
    "mode: pool\nworkers: 4\nlisten:\n  - unix: /run/x.sock\n    mode: \"0660\"\nexec: [/bin/true]\n"
    "limits: {nofile: 1024, core: {soft: 0, hard: infinity}}\nstop_timeout: 1m30s\nrestart_delay: 250ms\n",
    "listen: [{udp: '[::1]:53'}]\nexec: [/bin/true]\nenvironment: {A: 1, B: x}\n"
    "start_limit: {burst: 5, interval: 10s}\n"
    "watchdog: 10s\nready: notify\nuser: nobody\numask: \"022\"\nnice: 5\nstop_signal: SIGINT\n",
]

HOSTILE = [
    "[accept]", "{a: 1}", "9" * 400, "9" * 5000, "'" + "9" * 400 + "s'", "2001-02-30", "2001-02-03",
    "!!int 0xfff+f", "!!bool maybe", "!!float x", "!!binary '!!'", "!!timestamp 2001-13-01", "!!set {a}",
    ".inf", "-.inf", ".nan", "1e308", "-1", "0", "2147483648", "4294967296", "18446744073709551616",
    "'" + "9" * 400 + "K'", "'1e400'", "1:2:3:4", "0x7fffffff", "0o777", "0b101", "~", "''", "\"\\0\"",
    "\"a\\x00b\"", "\"\\t\"", "yes", "true", "*nope", "&a [*a]", "!!python/object:os.system x",
    "[" * 200 + "]" * 200, "{x: " * 100 + "1" + "}" * 100, "\"\\ud800\"", "'" + "x" * 10000 + "'",
]
CHARS = ["\x01", "\x7f", "\x85", "\ufeff", "\t", ":", "-", "[", "{", "&a", "*a", "!", "%", "@", "`", "\"", "'",
         "#", "|", ">", "\n", "\n  ", "<<: ", "? ", ",", "]", "}", "\u2028", "\ud800"]


def bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(8)
        if choice == 0 and ":" in text:  # replace a value
            spots = [m.end() for m in re.finditer(r": ", text)]
            if spots:
                at = rng.choice(spots)
                end = text.find("\n", at)
                end = len(text) if end < 0 else end
                cut = rng.choice([end, min(end, at + rng.randint(0, 8))])
                text = text[:at] + rng.choice(HOSTILE) + text[cut:]
        elif choice == 1:  # insert characters
            at = rng.randint(0, len(text))
            text = text[:at] + rng.choice(CHARS) + text[at:]
        elif choice == 2 and text:  # delete a span
            at = rng.randrange(len(text))
            text = text[:at] + text[at + rng.randint(1, 6):]
        elif choice == 3 and text:  # flip a character
            at = rng.randrange(len(text))
            text = text[:at] + chr(rng.randrange(0, 0x250)) + text[at + 1:]
        elif choice == 4:  # duplicate or drop a line
            lines = text.split("\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i]) if rng.random() < 0.5 else lines.pop(i)
            text = "\n".join(lines)
        elif choice == 5:  # an alias bomb, used by some key
            key = rng.choice(["mode", "exec", "stop_timeout", "allow", "environment", "listen", "name"])
            level = rng.randint(3, 8)
            text = bomb(level) + text + f"\n{key}: *a{level}\n"
        elif choice == 6:  # a second document, or an empty one
            text = text + rng.choice(["---\n", "---\n" + text, "...\n"])
        else:  # a hostile value under a random known key
            key = rng.choice(["mode", "stop_timeout", "restart_delay", "workers", "max_connections", "nice",
                              "umask", "user", "fd_store_max", "watchdog", "start_timeout", "limits",
                              "start_limit", "rate", "exec", "environment", "listen", "restart_reset"])
            text = re.sub(rf"(?m)^{key}:.*$", "", text) + f"\n{key}: {rng.choice(HOSTILE)}\n"
    return text


def check(text: str) -> str | None:
    """None when the input behaved; else what went wrong."""
    try:
        load_units_from_text(text, "fuzz.yaml")
    except ConfigError as exc:
        for problem in exc.problems:
            line = str(problem)
            if not LOCATED.fullmatch(line) or len(line) > 2000:
                return f"bad line: {line[:300]!r}"
    except Exception:
        return "traceback: " + traceback.format_exc(limit=3)[-600:]
    return None


def corpus() -> list[str]:
    root = os.path.join(os.path.dirname(__file__), "..", "config", "sockets.d")
    files = sorted(glob.glob(os.path.join(root, "*.yaml")))
    return SEEDS + [open(f, encoding="utf-8").read() for f in files]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="inputs (default 100000)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seeds = corpus()
    tracebacks = bad = slow = 0
    kinds: dict[str, int] = {}
    start = time.monotonic()
    for i in range(args.n):
        text = mutate(rng, rng.choice(seeds))
        t0 = time.monotonic()
        result = check(text)
        if time.monotonic() - t0 > 1.0:
            slow += 1
            print(f"slow input #{i} ({time.monotonic() - t0:.2f}s): {text[:200]!r}", file=sys.stderr)
        if result is not None:
            tracebacks += result.startswith("traceback")
            bad += result.startswith("bad line")
            key = result.strip().splitlines()[-1][:120]
            if key not in kinds:
                print(f"input #{i}: {result}\n  text: {text[:300]!r}", file=sys.stderr)
            kinds[key] = kinds.get(key, 0) + 1
    elapsed = time.monotonic() - start
    print(f"inputs {args.n}, tracebacks {tracebacks}, bad lines {bad}, slow {slow}, "
          f"time {elapsed:.1f}s ({args.n / elapsed:.0f}/s), seed {args.seed}")
    for key, count in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {count:6d}  {key}")
    return 1 if tracebacks or bad or slow else 0


if __name__ == "__main__":
    raise SystemExit(main())
