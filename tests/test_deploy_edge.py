"""The edge-node systemd unit and its environment file: flags exist in the installed
flower-supernode, the node config parses, and the exact command line connects to a real
SuperLink over TLS with authentication."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedlora.deploy.local import LocalFederation
from fedlora.deploy.processes import free_port

from .conftest import assert_none_under_flwr_home

EDGE = Path(__file__).resolve().parents[1] / "deploy" / "edge"
UNIT = EDGE / "fedlora-supernode.service"
ENV_FILE = EDGE / "supernode.env"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, with backslash line continuations joined."""
    entries, section, pending = [], "", ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def read_env_file(text: str) -> dict[str, str]:
    """The subset of systemd's EnvironmentFile= syntax that supernode.env may use:
    KEY=unquoted, KEY='literal', KEY="text" (no escapes, no $ expansion)."""
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), key
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            assert "\\" not in value and "$" not in value, f"keep {key} free of escapes"
            value = value[1:-1]
        else:
            assert not any(c in value for c in "'\"\\$ "), f"quote the value of {key}"
        env[key] = value
    return env


def exec_start_argv(env: dict[str, str]) -> list[str]:
    """ExecStart= as systemd runs it: split into words (quotes respected and removed),
    then ${VAR} inside a word replaced by the variable's exact value (one argument)."""
    (value,) = [
        v for s, k, v in unit_entries(UNIT.read_text()) if (s, k) == ("Service", "ExecStart")
    ]
    words = shlex.split(value)
    return [_VAR.sub(lambda m: env[m.group(1)], word) for word in words]


def supernode_flags() -> set[str]:
    exe = Path(sys.executable).parent / "flower-supernode"
    help_text = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


def test_unit_uses_only_real_supernode_flags_and_defined_variables() -> None:
    env = read_env_file(ENV_FILE.read_text())
    (value,) = [v for s, k, v in unit_entries(UNIT.read_text()) if k == "ExecStart"]
    assert set(_VAR.findall(value)) <= set(env), "ExecStart uses a variable the .env lacks"
    argv = exec_start_argv(env)
    assert argv[0] == "/opt/fedlora/venv/bin/flower-supernode"
    used = {word for word in argv if word.startswith("--")}
    assert used <= supernode_flags(), used - supernode_flags()
    # TLS on (no --insecure), authenticated, verifies the SuperLink with our CA.
    assert "--insecure" not in argv
    assert {"--root-certificates", "--auth-supernode-private-key", "--superlink"} <= used
    entries = unit_entries(UNIT.read_text())
    assert ("Service", "EnvironmentFile", "/etc/fedlora/supernode.env") in entries
    assert ("Service", "User", "fedlora") in entries


def test_node_config_parses_as_flower_does() -> None:
    env = read_env_file(ENV_FILE.read_text())
    argv = exec_start_argv(env)
    node_config = parse_config_args([argv[argv.index("--node-config") + 1]])
    assert node_config == {
        "data-path": "/var/lib/fedlora/data",
        "max-epsilon": 3.0,
        "ledger-dir": "/var/lib/fedlora/ledger",
        "key-dir": "/var/lib/fedlora/keys",
        "device": "cpu",
        "lora-rank": 8,
    }
    # The documented alternative (a partition of the job's dataset) parses too.
    alternative = re.search(r"^# (FEDLORA_DATA_CONFIG=.*)$", ENV_FILE.read_text(), re.M)
    assert alternative is not None
    env.update(read_env_file(alternative.group(1)))
    argv = exec_start_argv(env)
    node_config = parse_config_args([argv[argv.index("--node-config") + 1]])
    assert node_config["partition-id"] == 0 and node_config["num-partitions"] == 2


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_file_passes_systemd_analyze(tmp_path: Path) -> None:
    text = UNIT.read_text()
    text = text.replace(
        "/opt/fedlora/venv/bin/flower-supernode",
        str(Path(sys.executable).parent / "flower-supernode"),
    )
    text = text.replace("/etc/fedlora/supernode.env", str(ENV_FILE))
    unit = tmp_path / "fedlora-supernode.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
    )
    # Unknown user/group on this machine is fine; anything else is not.
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and not re.search(r"user|group", line, re.IGNORECASE)
    ]
    assert result.returncode == 0 or not problems, result.stdout + result.stderr
    assert not problems, problems


@pytest.mark.integration
def test_exact_unit_command_line_joins_a_tls_authenticated_superlink(tmp_path: Path) -> None:
    work = tmp_path / "work"
    try:
        with LocalFederation(work) as fed:
            endpoint = fed.start_superlink()
            pair = fed.ensure_node_key("edge-node")
            fed.register_supernodes({"edge-node": pair.public_key})
            env = read_env_file(ENV_FILE.read_text())
            env.update(
                FEDLORA_SUPERLINK=endpoint.fleet_address,
                FEDLORA_CA_CERT=str(endpoint.ca_cert),
                FEDLORA_NODE_KEY=str(pair.private_key),
                FEDLORA_DATA_CONFIG=f"data-path='{tmp_path / 'data'}'",
                FEDLORA_LEDGER_DIR=str(tmp_path / "ledger"),
                FEDLORA_KEY_DIR=str(tmp_path / "keys"),
                FEDLORA_CLIENTAPPIO_PORT=str(free_port()),
            )
            argv = exec_start_argv(env)
            argv[0] = str(Path(sys.executable).parent / "flower-supernode")
            proc = fed.start_process("edge-node", argv)
            fed.supernodes["edge-node"] = proc
            node_ids = fed.wait_for_nodes(["edge-node"], timeout_s=60)
            assert proc.is_running() and node_ids["edge-node"] > 0
    finally:
        assert_none_under_flwr_home(work)

