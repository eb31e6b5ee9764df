"""Assignments read from a shell-style configuration file (Debian's /etc/default/kdump-tools,
the sysconfig files of Fedora and SUSE), the way `sh` reads them when the peer sources the
file, without running anything.

What sh would do is followed for what such files hold: `[export] NAME=WORD` statements, one
or more per line, words made of unquoted text (a backslash keeps the next character), 'single
quotes' (nothing special inside), "double quotes" (backslash keeps only $ ` " \\ and newline),
backslash-newline continuations, `# comments` where a word starts, and `$NAME`/`${NAME}`
taken from what the file assigned before. Anything else (command substitution, `${X:-y}`, a
variable the file never set, a command, a function, `if`) is never evaluated: the statement is
returned with `problem` saying why, so that the importer reports it instead of guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=")
_DOUBLE_ESCAPES = '$`"\\\n'
# Characters that end an unquoted word, or start syntax this reader does not evaluate.
_OPERATORS = ";&|<>()"
# First words that open and close a block whose assignments run only sometimes, or never.
_OPENS = re.compile(r"(?:if|case|for|while|until|\{)(?:\s|$)|[A-Za-z_][A-Za-z0-9_]*\s*\(\)")
_CLOSES = re.compile(r"(?:fi|esac|done|\})(?:[\s;]|$)")


@dataclass(frozen=True)
class Statement:
    """One statement of the file: an assignment (`name` set) or something else."""

    line: int  # where it starts, 1-based
    text: str  # its source text, continuation lines joined as written
    name: str | None = None
    value: str | None = None  # None when it cannot be read without running something
    problem: str | None = None  # why the value, or the statement, is not read
    refs: tuple[str, ...] = ()  # the variables its value expanded


class _Unreadable(Exception):
    pass


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.variables: dict[str, str] = {}
        self.refs: list[str] = []

    def line_at(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_blanks(self) -> None:
        """Spaces and tabs, and backslash-newline (which joins lines outside quotes)."""
        while True:
            if self.peek() in (" ", "\t"):
                self.pos += 1
            elif self.text.startswith("\\\n", self.pos):
                self.pos += 2
            else:
                return

    def skip_comment(self) -> None:
        if self.peek() == "#":
            end = self.text.find("\n", self.pos)
            self.pos = len(self.text) if end < 0 else end

    def skip_to_end_of_statement(self) -> None:
        """After a statement that is not read: past the rest of its line, honouring quotes
        and continuations, so that a quoted newline does not start a new statement."""
        quote = ""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if quote:
                if char == "\\" and quote == '"':
                    self.pos += 1
                elif char == quote:
                    quote = ""
            elif char == "\\":
                self.pos += 1
            elif char in "'\"":
                quote = char
            elif char == "\n":
                return
            self.pos += 1

    def word(self) -> str:
        """One shell word from here, expanded; raises _Unreadable for what it cannot read."""
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t\n" or char in _OPERATORS:
                break
            if char == "\\":
                nxt = self.text[self.pos + 1 : self.pos + 2]
                self.pos += 2
                if nxt != "\n":
                    out.append(nxt)
            elif char == "'":
                end = self.text.find("'", self.pos + 1)
                if end < 0:
                    raise _Unreadable("a single quote is never closed")
                out.append(self.text[self.pos + 1 : end])
                self.pos = end + 1
            elif char == '"':
                out.append(self.double_quoted())
            else:
                out.append(self.expanded(char))
        return "".join(out)

    def expanded(self, char: str) -> str:
        """The character here, or what the `$` expansion it starts stands for."""
        if char == "$":
            return self.expansion()
        if char == "`":
            raise _Unreadable("command substitution (`...`) is not run")
        self.pos += 1
        return char

    def double_quoted(self) -> str:
        out: list[str] = []
        self.pos += 1
        while True:
            if self.pos >= len(self.text):
                raise _Unreadable("a double quote is never closed")
            char = self.text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(out)
            if char == "\\" and self.text[self.pos + 1 : self.pos + 2] in _DOUBLE_ESCAPES:
                nxt = self.text[self.pos + 1]
                self.pos += 2
                if nxt != "\n":
                    out.append(nxt)
            else:
                out.append(self.expanded(char))

    def expansion(self) -> str:
        rest = self.text[self.pos + 1 :]
        if rest.startswith("("):
            raise _Unreadable("command or arithmetic substitution ($(...)) is not run")
        braced = re.match(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", rest)
        plain = _NAME.match(rest)
        if braced:
            name, length = braced.group(1), braced.end()
        elif rest.startswith("{"):
            raise _Unreadable("a parameter expansion other than ${NAME} is not evaluated")
        elif plain:
            name, length = plain.group(), plain.end()
        else:
            # A lone $ (before a space, a quote, the end) is a literal dollar sign to sh.
            self.pos += 1
            return "$"
        if name not in self.variables:
            raise _Unreadable(f"${name} is not set earlier in this file")
        self.pos += 1 + length
        self.refs.append(name)
        return self.variables[name]


def parse(text: str) -> list[Statement]:
    """Every statement in the file, in order: assignments with their values (or a problem),
    and whatever else the file holds (with a problem)."""
    reader = _Reader(text)
    statements: list[Statement] = []
    blocks: list[int] = []  # the lines where the open if/case/loop/function blocks start
    while reader.pos < len(text):
        reader.skip_blanks()
        reader.skip_comment()
        if reader.peek() in ("\n", ";"):
            reader.pos += 1
            continue
        if not reader.peek():
            break
        start = reader.pos
        exported = re.match(r"export[ \t]+", text[start:])
        if exported:
            reader.pos += exported.end()
        found = _ASSIGNMENT.match(text, reader.pos)
        if not found:
            reader.skip_to_end_of_statement()
            source = text[start : reader.pos]
            if _OPENS.match(source):
                blocks.append(reader.line_at(start))
            elif _CLOSES.match(source) and blocks:
                blocks.pop()
            statements.append(
                Statement(
                    reader.line_at(start),
                    source.rstrip(),
                    problem="not an assignment; sh would run it as a "
                    "command, which the importer never does",
                )
            )
            continue
        name = found.group(1)
        reader.pos = found.end()
        reader.refs = []
        try:
            value: str | None = reader.word()
            problem = None
        except _Unreadable as exc:
            value, problem = None, str(exc)
        if value is not None:
            reader.skip_blanks()
            # `A=1 B=2` assigns both; `A=1 cmd` runs cmd with A in its environment.
            at_end = reader.peek() in ("", "\n", "#", ";")
            if not at_end and not _ASSIGNMENT.match(text, reader.pos):
                value, problem = None, "the assignment is followed by a command"
        if value is None:
            reader.skip_to_end_of_statement()
        elif blocks:
            value, problem = (
                None,
                (f"inside the block that starts on line {blocks[-1]}, which sh may run or skip"),
            )
        source = text[start : reader.pos].rstrip()
        statements.append(
            Statement(reader.line_at(start), source, name, value, problem, tuple(reader.refs))
        )
        if value is not None:
            reader.variables[name] = value
    return statements


def helpers(statements: list[Statement]) -> dict[str, int]:
    """Variables whose values other assignments expand: name → the first line that does."""
    used: dict[str, int] = {}
    for st in statements:
        for name in st.refs:
            used.setdefault(name, st.line)
    return used
