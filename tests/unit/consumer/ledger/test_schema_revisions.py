"""The schema revision check's rules (consumer/ledger/schema.py), and the convention that makes a
later revision recognisable without its file: ids are sequence numbers on one linear chain."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from consumer.ledger.migrate import MIGRATIONS
from consumer.ledger.models import API_TABLES, metadata
from consumer.ledger.schema import (
    CONSUMER_TABLES,
    Revisions,
    SchemaState,
    code_revisions,
    read_revisions,
)


def test_migrations_are_one_numbered_chain() -> None:
    script = ScriptDirectory(str(MIGRATIONS))
    assert len(script.get_heads()) == 1, "one head: a branch would make 'later' undecidable"
    previous = None
    for number, revision in enumerate(reversed(list(script.walk_revisions())), start=1):
        assert re.fullmatch(r"\d{4}", revision.revision), revision.revision
        assert int(revision.revision) == number, "revision ids count up from 0001, no gaps"
        assert revision.down_revision == previous
        previous = revision.revision


def test_the_code_knows_its_chain_as_alembic_reads_it() -> None:
    script = ScriptDirectory(str(MIGRATIONS))
    alembic_chain = tuple(reversed([revision.revision for revision in script.walk_revisions()]))
    assert code_revisions().chain == alembic_chain
    assert code_revisions().head == script.get_current_head()


NEXT = '''"""A migration as another tool may name it."""
revision = "{revision}"
down_revision = "{down}"


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
'''


@pytest.mark.parametrize(
    ("name", "revision"),
    [
        ("9998_next.py", "9998"),
        ("9998-hotfix.py", "9998"),  # not shaped like ours: still a migration to alembic
        ("ae1027a6acf_next.py", "ae1027a6acf"),  # `alembic revision`'s own naming
        ("9998_next.py", "9998a"),  # the file's name is not its revision
    ],
)
def test_any_migration_file_reads_as_alembic_reads_it(
    tmp_path: Path, name: str, revision: str
) -> None:
    shutil.copytree(MIGRATIONS, tmp_path, dirs_exist_ok=True)
    down = code_revisions().head
    (tmp_path / "versions" / name).write_text(NEXT.format(revision=revision, down=down))
    (tmp_path / "versions" / ".#9999_lock.py").write_text("an editor's lock file")
    script = ScriptDirectory(str(tmp_path))
    alembic_chain = tuple(reversed([rev.revision for rev in script.walk_revisions()]))
    assert read_revisions(tmp_path).chain == alembic_chain
    assert alembic_chain[-1] == revision


def test_the_consumer_tables_are_the_models_but_the_api_keys() -> None:
    assert set(metadata.tables) - API_TABLES == CONSUMER_TABLES


@pytest.mark.parametrize(
    ("found", "state"),
    [
        (["0003"], SchemaState.CURRENT),
        (["0002"], SchemaState.BEHIND),
        (["0001"], SchemaState.BEHIND),
        ([], SchemaState.MISSING),
        (["0004"], SchemaState.AHEAD),  # a later release: migrations are additive
        (["9999"], SchemaState.AHEAD),
        (["0000"], SchemaState.UNKNOWN),  # numbered, but before ours: no release wrote it
        (["c0ffee"], SchemaState.UNKNOWN),  # another application's alembic
        (["0003", "0004"], SchemaState.UNKNOWN),  # branches
    ],
)
def test_judge(found: list[str], state: SchemaState) -> None:
    assert Revisions(("0001", "0002", "0003")).judge(found) is state
