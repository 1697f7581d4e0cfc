"""Citations in the code point at docs inside the repository: a README or docs/ page named with
a section in quotes after it names a heading that exists there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    p for d in ("gpupack", "tests", "experiments", "benchmarks", "slurm") for p in (ROOT / d).rglob("*.py")
    if p != Path(__file__).resolve()
]
CITATION = re.compile(r'(?<![\w/])((?:slurm/|benchmarks/|docs/[\w-]+\.md)?README(?:\.md)?|docs/[\w-]+\.md) "([^"]+)"')


def _headings(doc: Path) -> set[str]:
    return {line.lstrip("#").strip().strip("`") for line in doc.read_text().splitlines() if line.startswith("#")}


def test_every_cited_section_exists() -> None:
    missing = []
    for path in SOURCES:
        for m in CITATION.finditer(path.read_text()):
            doc = m[1] if m[1].endswith(".md") else m[1] + ".md"
            target = ROOT / doc
            if not target.is_file() or m[2] not in _headings(target):
                missing.append(f"{path.relative_to(ROOT)}: {m[0]}")
    assert missing == []



def test_nothing_cites_a_document_outside_the_repository() -> None:
    design = "DESIGN" + ".md"  # spelt in two parts so that this file does not cite it either
    assert [str(p.relative_to(ROOT)) for p in SOURCES if design in p.read_text()] == []
