"""Reads the Dockerfile for the tests: its stages and instructions, ENV with Docker's expansion,
and the image's paths moved under a directory, so a test can rebuild the image's tree there.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tools.harness import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, None for shell form."""
        try:
            value = json.loads(self.args)
        except ValueError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None

    def flags(self) -> tuple[dict[str, str], str]:
        """Leading `--name=value` flags (COPY --from, HEALTHCHECK --interval) and the rest."""
        flags, rest = {}, self.args
        while match := re.match(r"--([\w-]+)=(\S+)\s+", rest):
            flags[match[1]] = match[2]
            rest = rest[match.end() :]
        return flags, rest


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]

    def env(
        self, base_env: dict[str, str] | None = None, moved_to: Path | None = None
    ) -> dict[str, str]:
        """Every ENV of the stage, values expanded as Docker does ($NAME, ${NAME}) from the
        stage's earlier ENVs and `base_env` (the base image's, e.g. its PATH). With `moved_to`,
        the image's own paths in the values are moved under that directory first."""
        env = dict(base_env or {})
        for instruction in self.all("ENV"):
            for pair in shlex.split(instruction.args):
                name, sep, value = pair.partition("=")
                assert sep, f"ENV {pair!r}: use the NAME=value form"
                if moved_to is not None:
                    value = relocate(value, moved_to)
                env[name] = _VARIABLE.sub(lambda m: env.get(m[1] or m[2], ""), value)
        return env


def read(path: Path = DOCKERFILE) -> list[Stage]:
    """The stages of a Dockerfile: comments dropped, continued lines joined."""
    stages: list[Stage] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        start = start or number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending, instruction = "", Instruction(keyword.upper(), args.strip(), start)
        start = 0
        if instruction.keyword == "FROM":
            parts = instruction.args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        else:
            assert stages, f"line {instruction.line}: {instruction.keyword} before FROM"
            stages[-1].instructions.append(instruction)
    return stages


def under(root: Path, image_path: str) -> Path:
    """Where an absolute path of the image lies in a tree rebuilt under `root`."""
    assert image_path.startswith("/"), image_path
    return root / image_path.lstrip("/")


def relocate(value: str, root: Path, keep: tuple[str, ...] = ("$PATH", "${PATH}")) -> str:
    """An ENV value with every absolute path in it (also each part of a PATH list) moved under
    `root`; other values are left as they are."""
    parts = value.split(":")
    if not all(p.startswith("/") or p in keep for p in parts):
        return value
    return ":".join(p if p in keep else str(under(root, p)) for p in parts)


def ignored_allowlist(path: Path = DOCKERIGNORE) -> set[str]:
    """The `!path` entries of an allowlist .dockerignore (one that starts by ignoring `*`)."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    assert entries and entries[0] == "*", ".dockerignore should start by ignoring everything"
    return {line[1:].rstrip("/") for line in entries if line.startswith("!")}
