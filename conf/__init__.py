"""fedlora's Hydra configs. Importing this package (Hydra does, to read pkg://fedlora.conf)
registers the typed job schema that conf/config.yaml builds on."""

from fedlora.task.schema import register_schema

register_schema()
