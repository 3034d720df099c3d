"""Alembic's entry point: runs the service migrations on the connection `Database.migrate()` hands over,
inside the transaction (and lock) it holds."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "the service migrations run through ragline.serve.db.Database.migrate() (e.g. `ragline keys list` "
        "or starting the server), which passes the database connection; plain `alembic` is not set up"
    )
context.configure(connection=connection)
with context.begin_transaction():
    context.run_migrations()
