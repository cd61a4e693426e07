"""Reading deploy/ as its consumers do: the Procfile (honcho, foreman), systemd units and their EnvironmentFile."""

from __future__ import annotations

import re
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEPLOY = ROOT / "deploy"
INSTALL_DIR = "/opt/enrich"  # where the units expect the checkout (README: Deploy)
ENV_FILE = "/etc/enrich/enrich.env"
_ASSIGNMENT = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


def procfile() -> list[tuple[str, str]]:
    """(process type, command) per line, as honcho and foreman parse it."""
    lines = (DEPLOY / "Procfile").read_text().splitlines()
    return [(m[1], m[2]) for m in (re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line) for line in lines) if m]


def env_file(path: Path, commented: bool = False) -> dict[str, str]:
    """NAME=value lines of an EnvironmentFile; `commented`: also the `# NAME=value` suggestions."""
    values = {}
    for line in path.read_text().splitlines():
        match = _ASSIGNMENT.match(line.strip())
        if match and (commented or not match[1]):
            values[match[2]] = match[3]
    return values


@dataclass
class Unit:
    """A systemd unit file: its [Service] entries in order (keys may repeat, as Environment= does)."""

    name: str
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def read(cls, name: str) -> Unit:
        unit = cls(name)
        section = ""
        for raw in (DEPLOY / name).read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                unit.sections.setdefault(section, [])
            else:
                key, _, value = line.partition("=")
                unit.sections[section].append((key.strip(), value.strip()))
        return unit

    def values(self, key: str, section: str = "Service") -> list[str]:
        return [value for name, value in self.sections.get(section, []) if name == key]

    def value(self, key: str, section: str = "Service") -> str:
        (value,) = self.values(key, section)
        return value


@dataclass
class Host:
    """Where a unit runs in a test: systemd's specifiers and the paths the unit names, mapped into tmp."""

    state_root: Path  # %S, /var/lib
    env_files: dict[str, Path]  # a path a unit names -> the file standing in for it
    instance: str = ""

    def specifiers(self, text: str) -> str:
        table = {"i": self.instance, "I": self.instance, "H": socket.gethostname(), "S": str(self.state_root)}

        def one(match: re.Match) -> str:
            letter = match[1]
            if letter == "%":
                return "%"
            if letter not in table:
                raise AssertionError(f"the test does not model the specifier %{letter}")
            return table[letter]

        return re.sub(r"%(.)", one, text)

    def path(self, text: str) -> str:
        return text.replace(f"{INSTALL_DIR}/.venv/bin/", f"{BIN}/").replace(INSTALL_DIR, str(ROOT))

    def environment(self, unit: Unit, base: dict[str, str]) -> dict[str, str]:
        """Environment= then EnvironmentFile= (whose values win, whatever the order), as systemd does."""
        assigned: dict[str, str] = {}
        for word in (w for value in unit.values("Environment") for w in shlex.split(self.specifiers(value))):
            name, _, value = word.partition("=")
            assigned[name] = value
        from_files: dict[str, str] = {}
        for value in unit.values("EnvironmentFile"):
            optional = value.startswith("-")
            named = self.specifiers(value.lstrip("-"))
            path = self.env_files.get(named)
            if path is None or not path.exists():
                assert optional, f"{unit.name} needs {named}"
                continue
            from_files.update(env_file(path))
        return {**base, **assigned, **from_files}

    def exec_start(self, unit: Unit, env: dict[str, str]) -> list[str]:
        """ExecStart as systemd runs it: specifiers, then ${NAME} inside a word and $NAME as words."""
        command: list[str] = []
        for word in shlex.split(self.specifiers(unit.value("ExecStart"))):
            whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
            if whole:
                command.extend(env.get(whole[1], "").split())
            else:
                command.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m[1], ""), word))
        return [self.path(word) for word in command]


FLAGS = {"--no-control-socket", "--quiet"}  # options of these commands that take no value


def options(command: list[str]) -> tuple[dict[str, str], list[str]]:
    """A gunicorn or celery command line's options (name -> value) and positional words, program left out."""
    named: dict[str, str] = {}
    positional: list[str] = []
    words = iter(command[1:])
    for word in words:
        if word in FLAGS:
            named[word] = ""
        elif word.startswith("-"):
            named[word] = next(words)
        else:
            positional.append(word)
    return named, positional
