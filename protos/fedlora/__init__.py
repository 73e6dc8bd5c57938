"""Generated protobuf code of the fedlora wire contract (see protos/generate.py)."""
