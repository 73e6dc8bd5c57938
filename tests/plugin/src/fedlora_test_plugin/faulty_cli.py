"""The `fedlora` command line with fault injection (faults.py), for the fault suite.

    python -m fedlora_test_plugin.faulty_cli simulate [overrides] faults={0:nan,3:truncated}

The ``faults=`` argument (partition-id -> fault kind, Hydra's map syntax) is taken out;
the rest goes to fedlora's CLI (fedlora.deploy.cli) unchanged, and every simulation it
runs in this process (a multirun's jobs and `resume` included) wraps the nodes'
ClientApp in :class:`~fedlora_test_plugin.faults.FaultInjection` through
fedlora.deploy.simulate.client_mods.
"""

from __future__ import annotations

import sys

from .faults import FaultInjection

PREFIX = "faults="


def parse_faults(text: str) -> dict[int, str]:
    """``{0:nan,3:truncated}`` (braces optional, empty allowed) as {0: "nan", 3: "truncated"}."""
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        body = body[1:-1]
    faults: dict[int, str] = {}
    for item in (part.strip() for part in body.split(",")):
        if not item:
            continue
        partition, sep, kind = item.partition(":")
        if not sep or not partition.strip().isdigit() or not kind.strip():
            raise ValueError(f"faults: {item!r} is not PARTITION:KIND")
        faults[int(partition)] = kind.strip()
    return faults


def split_faults(argv: list[str]) -> tuple[dict[int, str], list[str]]:
    """The faults map given in ``argv`` (``faults=...``, the last one wins) and the rest."""
    faults: dict[int, str] = {}
    rest = []
    for arg in argv:
        if arg.startswith(PREFIX):
            faults = parse_faults(arg[len(PREFIX):])
        else:
            rest.append(arg)
    return faults, rest


def main(argv: list[str] | None = None) -> int:
    from fedlora.deploy.cli import main as fedlora_main
    from fedlora.deploy.simulate import client_mods

    faults, rest = split_faults(list(sys.argv[1:] if argv is None else argv))
    with client_mods(FaultInjection(faults)):
        return fedlora_main(rest)


if __name__ == "__main__":
    sys.exit(main())
