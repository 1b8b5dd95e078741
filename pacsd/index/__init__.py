"""The SQL index: schema, engine, the group-committing writer."""
