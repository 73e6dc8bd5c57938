"""Hydra configs this plug-in adds to fedlora's search path (conf/strategy/frozenb.yaml)."""
