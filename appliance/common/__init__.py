"""The floor the service's layers stand on: the config, the request and result types, request errors,
SQLite, conversation history and the usage ledger. Imports nothing above it."""
