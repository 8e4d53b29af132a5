"""What the package's comments point at exists: cited docs sections and named test files."""
import re

from tests.helpers.paths import REPO

# Comments wrap: "# " at a line start continues the sentence of the line before.
SOURCES = {p: re.sub(r"\n\s*#\s*", " ", p.read_text()) for p in sorted((REPO / "megatron_tip").rglob("*.py"))}


def test_cited_docs_sections_exist():
    cited = [(p, doc, sec) for p, text in SOURCES.items()
             for doc, sec in re.findall(r"(docs/[\w/]+\.md),\s*\"([^\"]+)\"", text)]
    assert cited  # the pattern finds citations
    missing = [(p.name, doc, sec) for p, doc, sec in cited
               if not (REPO / doc).is_file() or sec.lower() not in (REPO / doc).read_text().lower()]
    assert not missing


def test_named_test_files_exist():
    named = {(p.name, t) for p, text in SOURCES.items() for t in re.findall(r"\btests/[\w/]+\.py", text)}
    assert named and not {(f, t) for f, t in named if not (REPO / t).is_file()}
