"""fedlora wire contract, schema version 1 (adapter.proto and its generated code)."""
