"""Alembic environment: runs tuneloop's migrations against the URL Store.open passes in."""

from __future__ import annotations

from alembic import context

from jobs.store import Base, make_engine

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url is not None, "jobs.store.migrate sets sqlalchemy.url"

engine = make_engine(url)
try:
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
finally:
    engine.dispose()
