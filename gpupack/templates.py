"""Placeholders in manifest strings: compiled once per template, rendered once per expansion.

The contract (README "The manifest"): `name`, `cmd`, `env` values, `depends_on` and `outputs`
may hold placeholders, `str.format` style:
- `{KEY}` for a grid key, and the built-ins `{name}` (the expanded name), `{phase}`, `{out}`
  (the experiment's own directory, <run>/exp/<name>), `{run}` (the run directory), `{gpus}`,
  `{nodes}`;
- `{{` and `}}` are literal braces (`${{HOME}}` reaches bash as `${HOME}`);
- a format spec is allowed (`{seed:03d}`); a conversion (`{x!r}`), attribute (`{x.y}`) or
  index (`{x[0]}`) access is refused: values are scalars, and lookups would reach Python objects;
- a key is a letter or `_`, then letters, digits, `_` or `-`;
- the name may use grid keys, `{phase}`, `{gpus}` and `{nodes}`: `{name}`, `{out}` and `{run}` are made from it;
- true/false render as `true`/`false`, as YAML spells them.
An unknown or malformed placeholder is a ValueError saying what to write instead.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass

from .units import show_value as _show

BUILTIN_PLACEHOLDERS = ("name", "phase", "out", "run", "gpus", "nodes")
NAME_PLACEHOLDERS = ("phase", "gpus", "nodes")  # {name}, {out}, {run} are made from the name
_PLACEHOLDER_RE = re.compile(r"[^\W\d][\w-]*")


def is_placeholder_name(key: str) -> bool:
    return _PLACEHOLDER_RE.fullmatch(key) is not None


def text_problem(text: str) -> str | None:
    """Why a string can't reach bash, the environment or the filesystem (execve refuses NUL)."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (lone surrogate)"
    return None


def nearest(word: object, choices: list[str], list_all: bool = True) -> str:
    """" (did you mean 'x'?)", else the valid choices, or nothing where they are too many."""
    if len(choices) > 1000:  # difflib costs ~10 us a choice; 100,000 names would take seconds
        return ""
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid: {', '.join(choices)})" if list_all else ""


def render_scalar(value: object, spec: str = "") -> str:
    if spec:
        return format(value, spec)
    if isinstance(value, bool):
        return "true" if value else "false"  # as YAML spells it, not Python's True
    return str(value)


@dataclass(frozen=True)
class Template:
    """A string with {placeholders}, parsed once and rendered per expansion."""

    pieces: tuple[tuple[str, str | None, str], ...]  # (literal, placeholder or None, format spec)
    plain: str | None  # the same as a format string over rendered values, when no spec is used

    def render(self, values: Mapping[str, object], texts: Mapping[str, str]) -> str:
        """`texts`: the values already rendered; they serve every placeholder without a spec.
        ValueError or TypeError where a format spec doesn't suit its value."""
        if self.plain is not None:
            return self.plain.format_map(texts)  # C speed: 100,000 expansions x several fields
        return "".join(lit + (render_scalar(values[f], spec) if f else "") for lit, f, spec in self.pieces)


def compile_template(text: str, allowed: tuple[str, ...], name_field: bool = False) -> Template:
    """Parse `text` (str.format syntax, `{{` `}}` literal) or raise ValueError saying what to fix."""
    why = text_problem(text)
    if why:
        raise ValueError(f"{_show(text)} {why}")
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ValueError(f"bad braces in {_show(text)}: {e} (write {{{{ and }}}} for literal braces)") from None
    pieces: list[tuple[str, str | None, str]] = []
    for literal, name, spec, conversion in parsed:
        if name is None:
            pieces.append((literal, None, ""))
            continue
        written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        shell = " (write $VAR, or ${{VAR}} for a shell variable)" if literal.endswith("$") else ""
        spec = spec or ""
        # A width of 4+ digits is a typo, and {x:1000000000} would build a 1 GB string.
        if conversion or "{" in spec or re.search(r"\d{4}", spec) or not is_placeholder_name(name):
            raise ValueError(f"bad placeholder {_show(written)}: only {{key}} or {{key:spec}}; "
                             f"write {{{{ and }}}} for literal braces{shell}")
        if name not in allowed:
            if name_field and name in BUILTIN_PLACEHOLDERS:
                raise ValueError(f"placeholder {{{name}}} can't be used in the name (it is made from the name)")
            raise ValueError(f"unknown placeholder {_show(written)}{shell}{nearest(name, list(allowed))}")
        pieces.append((literal, name, spec))
    plain = None
    if not any(spec for _, _, spec in pieces):
        plain = "".join(lit.replace("{", "{{").replace("}", "}}") + (f"{{{f}}}" if f else "") for lit, f, _ in pieces)
    return Template(tuple(pieces), plain)
