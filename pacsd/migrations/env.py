"""Alembic environment: runs the revisions on the async engine pacsd uses."""

from __future__ import annotations

import asyncio

from alembic import context

from pacsd.index.db import create_engine
from pacsd.index.schema import metadata

config = context.config


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


async def main() -> None:
    engine = create_engine(config.attributes["database_url"])
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.attributes["database_url"], target_metadata=metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(main())
