"""Manifest YAML: text -> Python data, or a problem line with the line and column.

Duplicate keys are refused (PyYAML keeps the last `mem:` silently). libyaml, where PyYAML has it,
reads the common case fast; text on which the two parsers differ takes the pure-Python path, so a
manifest's meaning and its messages never depend on how PyYAML was built.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from .manifest_fields import Problems
from .units import show_value as _show


class _NoDuplicateKeys(yaml.constructor.SafeConstructor):
    """SafeConstructor refusing duplicate keys: PyYAML keeps the last `mem:` silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_show(key_node.value)}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


class Loader(yaml.SafeLoader, _NoDuplicateKeys):
    """The pure-Python loader: its messages (and line marks) are the ones users see."""


# Where libyaml accepts what the pure-Python loader refuses (or reads differently): tabs inside
# plain scalars, a lone `!` tag, a comment glued to a block scalar header, byte order marks and
# the non-ASCII line breaks. Such text takes the pure-Python path, so no manifest's meaning or
# refusal depends on whether libyaml is installed (found by differential fuzzing of the two).
LIBYAML_DIFFERS = re.compile("\t|!|[|>][-+0-9]*#|[\ufeff\x85\u2028\u2029]")
FastLoader: type | None = None
if getattr(yaml, "__with_libyaml__", False):

    class _CLoader(yaml.CSafeLoader, _NoDuplicateKeys):
        """libyaml's parser: a 10,000-experiment grid loads in a fraction of the time."""

    FastLoader = _CLoader


def read_yaml(text: str, problems: Problems) -> object:
    if FastLoader is not None and not LIBYAML_DIFFERS.search(text):
        try:
            return yaml.load(text, Loader=FastLoader)  # noqa: S506 - a SafeLoader equivalent
        except Exception:  # noqa: S110 - the pure-Python loader below says what is wrong
            pass  # libyaml words its errors differently: report them as the Python loader does
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "yaml"
        problems.add("manifest", where, " ".join(str(e.problem or e.context or "invalid YAML").split()))
    except RecursionError:
        problems.add("manifest", "yaml", "nested too deeply")
    except Exception as e:  # ReaderError (bad characters), int() of a 5000-digit number...
        problems.add("manifest", "yaml", " ".join(f"{e}".split()) or type(e).__name__)
    return None
