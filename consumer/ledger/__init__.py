"""The batch transaction: the pure merge rules, the SQL, the schema and its migrations."""
