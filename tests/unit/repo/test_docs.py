"""The repository's own documentation stays true: README.md and docs/*.md.

Every relative link resolves to a file (and its #anchor to a heading of that file), the
configuration table in docs/operations.md names exactly the consumer's settings, the README
stays a short front page, and every page and heading the code cites (docs/PAGE.md#HEADING)
exists. (tests/unit/repo/test_layout.py checks that nothing cites a document outside the repo.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumer.settings import Settings

REPO = Path(__file__).resolve().parents[3]
README = REPO / "README.md"
DOCS = REPO / "docs"
OPERATIONS = DOCS / "operations.md"
README_MAX_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # text may wrap lines
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
VARIABLE = re.compile(r"\bLEDGER_[A-Z0-9]+(?:_[A-Z0-9]+)*")
TABLE_ROW_VARIABLE = re.compile(r"^\|\s*`(LEDGER_[A-Z0-9_]+)`\s*\|", re.MULTILINE)


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("**/*.md"))]


def prose(markdown: str) -> str:
    """The text outside fenced code blocks (links and headings there are not real)."""
    return FENCE.sub("", markdown)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but `-` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for match in HEADING.finditer(prose(path.read_text())):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> Iterator[str]:
    text = INLINE_CODE.sub("", prose(path.read_text()))
    for match in LINK.finditer(text):
        target = match.group(1).strip("<>")
        if not EXTERNAL.match(target):
            yield target


def broken_link(source: Path, target: str) -> str | None:
    """Why `target`, linked from `source`, does not resolve; None when it does."""
    location, _, anchor = target.partition("#")
    resolved = (source.parent / location).resolve() if location else source
    if not resolved.exists():
        return f"{source.name}: {target}: no such file"
    if anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
        return f"{source.name}: {target}: no heading #{anchor} in {resolved.name}"
    return None


def setting_variables() -> set[str]:
    """The environment variable of every settings field, named as pydantic-settings reads it:
    an explicit alias as it is, otherwise the env prefix and the field name, upper-cased."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias or field.alias
        names.add(alias.upper() if isinstance(alias, str) else f"{prefix}{name}".upper())
    return names


def section(markdown: str, title: str) -> str:
    """The text under the level-2 heading `title`, up to the next level-2 heading."""
    start = re.search(rf"^## {re.escape(title)}[ \t]*$", markdown, re.MULTILINE)
    assert start is not None, f"no section '## {title}'"
    rest = markdown[start.end() :]
    end = re.search(r"^## ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def configuration_table() -> list[str]:
    return TABLE_ROW_VARIABLE.findall(section(OPERATIONS.read_text(), "Configuration"))


def test_the_documents_exist() -> None:
    for name in ("contract.md", "operations.md", "design.md", "development.md"):
        assert (DOCS / name).is_file(), name


@pytest.mark.parametrize("path", documents(), ids=lambda path: path.name)
def test_every_relative_link_resolves(path: Path) -> None:
    problems = [p for target in relative_links(path) if (p := broken_link(path, target))]
    assert problems == []


def test_the_readme_links_to_every_docs_page() -> None:
    linked = {
        (README.parent / target.partition("#")[0]).resolve() for target in relative_links(README)
    }
    assert {page.resolve() for page in DOCS.glob("*.md")} <= linked


def test_the_configuration_table_lists_every_setting_and_nothing_else() -> None:
    listed = configuration_table()
    assert sorted(listed) == sorted(setting_variables())
    assert len(listed) == len(set(listed)), "a variable is listed twice"


def test_every_variable_the_documents_name_is_a_setting() -> None:
    known = setting_variables()
    unknown = {
        f"{path.name}: {name}"
        for path in documents()
        for name in VARIABLE.findall(path.read_text())
        if name not in known
    }
    assert unknown == set()


def test_the_readme_is_a_short_front_page() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines"


CODE_CITATION = re.compile(r"docs/([a-z]+\.md)(#[a-z0-9-]+)?")


def code_citations() -> Iterator[tuple[str, str]]:
    """(file, cited page#anchor) for every docs/ page the sources, tests and migrations cite."""
    for top in ("consumer", "producer", "migrations", "tests", "devstack", "bench"):
        for path in sorted((REPO / top).rglob("*.py")):
            for page, anchor in CODE_CITATION.findall(path.read_text()):
                yield str(path.relative_to(REPO)), page + anchor


def test_every_docs_page_and_heading_the_code_cites_exists() -> None:
    cited = list(code_citations())
    assert len(cited) > 20  # the pattern still matches how the code cites
    broken = [
        (source, target)
        for source, target in cited
        if broken_link(DOCS / "design.md", target) is not None
    ]
    assert broken == []


def test_slugs_follow_github() -> None:
    assert slug("Identity and merge rules") == "identity-and-merge-rules"
    assert slug("`turn.started`") == "turnstarted"
    assert slug("Keys, partitioner and order") == "keys-partitioner-and-order"
    assert slug("chat_threads") == "chat_threads"
