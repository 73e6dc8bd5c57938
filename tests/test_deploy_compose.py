"""deploy/docker: compose.yaml and the Dockerfile, checked without Docker.

- every service, volume, certificate, key and secret path that compose.yaml names exists,
  or is produced by the generator commands its header documents (run here for real);
- every Flower flag it uses appears in the installed command's --help (flwr 1.39);
- hostnames the services dial are in the generated server certificate;
- (integration) the services' exact command lines, with docker's network names mapped
  to loopback, run a federation: SuperLink in process isolation + SuperExec executor,
  idempotent key registration, 2 authenticated SuperNodes, one FedAvg round.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from fedlora.deploy.federation import SuperLinkEndpoint
from fedlora.deploy.local import LocalFederation
from fedlora.deploy.processes import free_port

from .conftest import assert_none_under_flwr_home

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
BIN = Path(sys.executable).parent
FLOWER_COMMANDS = ("flower-superlink", "flower-supernode", "flower-superexec")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def documented_generator_commands() -> list[list[str]]:
    """The `python -m fedlora.deploy...` set-up lines of compose.yaml's header."""
    lines = re.findall(r"^#\s+(python -m fedlora\.deploy\.\S+ .*)$", COMPOSE.read_text(), re.M)
    return [shlex.split(line) for line in lines]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the documented generator commands; return the stand-in for deploy/docker."""
    docker_dir = tmp_path_factory.mktemp("docker")
    commands = documented_generator_commands()
    assert len(commands) == 2, "the header should document the cert and key commands"
    for argv in commands:
        out = argv.index("--out") + 1
        # Documented relative to the repo root: deploy/docker/generated/...
        assert argv[out].startswith("deploy/docker/generated/"), argv[out]
        argv[out] = str(docker_dir / argv[out].removeprefix("deploy/docker/"))
        subprocess.run([sys.executable, *argv[1:]], check=True, capture_output=True)
    return docker_dir


def _volume_parts(spec: str) -> tuple[str, str]:
    parts = spec.split(":")
    return parts[0], parts[1]


def _help_flags(argv0: list[str]) -> set[str]:
    text = subprocess.run([*argv0, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", text))


def test_services_images_and_dependencies() -> None:
    data = compose()
    svc = data["services"]
    assert {"superlink", "serverapp", "register", "supernode-0", "supernode-1"} <= set(svc)
    for name, service in svc.items():
        assert service["image"] == "fedlora:cpu", name
        build = service["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
        assert isinstance(service["command"], list), f"{name}: use the exec (list) form"
        for dependency in service.get("depends_on", {}):
            assert dependency in svc, f"{name} depends on unknown {dependency}"
    assert svc["register"]["restart"] == "no"
    assert svc["supernode-0"]["depends_on"]["register"]["condition"] == (
        "service_completed_successfully"
    )
    assert "healthcheck" in svc["superlink"]
    # The Control API is published on the host's loopback only.
    assert "127.0.0.1:8000:8000" in svc["superlink"]["ports"]


def test_every_path_exists_or_is_generated(generated: Path) -> None:
    data = compose()
    declared = set(data.get("volumes") or {})
    used_named = set()
    for name, service in data["services"].items():
        mounts = {}
        for spec in service.get("volumes", []):
            source, target = _volume_parts(spec)
            mounts[target] = source
            if source.startswith(("./", "../", "/")):
                assert source.startswith("./generated/"), f"{name}: {source} not generated"
                produced = generated / source.removeprefix("./")
                assert produced.is_file(), f"{name}: {source} is not produced by the scripts"
                if produced.suffix == ".key":
                    assert produced.stat().st_mode & 0o077 == 0, f"{source} must be private"
                assert spec.endswith(":ro"), f"{name}: mount {source} read-only"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used_named.add(source)
        # Every absolute container path in the command is mounted (or a volume dir).
        for word in service["command"]:
            for path in re.findall(r"(?<![\w.])/(?:certs|keys|secrets|state)/[\w./-]*", word):
                assert any(path == t or path.startswith(t.rstrip("/") + "/") for t in mounts), (
                    f"{name}: {path} is not mounted"
                )
    assert used_named == declared, f"unused volumes: {declared - used_named}"


def test_flags_exist_in_installed_flower(generated: Path) -> None:
    cache: dict[str, set[str]] = {}
    seen = set()
    for name, service in services().items():
        command = service["command"]
        if command[0] in FLOWER_COMMANDS:
            argv0 = [str(BIN / command[0])]
        elif command[:2] == ["python", "-m"]:
            argv0 = [sys.executable, "-m", command[2]]
        else:
            pytest.fail(f"{name}: unexpected command {command[0]}")
        key = " ".join(argv0)
        if key not in cache:
            cache[key] = _help_flags(argv0)
        used = {word for word in command if word.startswith("--")}
        assert used <= cache[key], f"{name}: {used - cache[key]} not in {command[0]} --help"
        seen.add(command[0])
    assert {"flower-superlink", "flower-superexec", "flower-supernode"} <= seen


def test_dialled_hostnames_are_in_the_certificate(generated: Path) -> None:
    cert = x509.load_pem_x509_certificate((generated / "generated/certs/server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName))
    for name, service in services().items():
        command = service["command"]
        for flag in ("--superlink", "--runtime-api-address", "--address"):
            if flag in command:
                host = command[command.index(flag) + 1].rsplit(":", 1)[0]
                assert host in names, f"{name} dials {host}, not in the certificate {names}"


def test_superlink_is_secure_and_supernodes_authenticate() -> None:
    svc = services()
    superlink = svc["superlink"]["command"]
    assert "--insecure" not in superlink
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"} <= set(superlink)
    assert "--enable-supernode-auth" in superlink
    assert superlink[superlink.index("--isolation") + 1] == "process"
    for i in range(2):
        node = svc[f"supernode-{i}"]["command"]
        assert "--insecure" not in node and "--root-certificates" in node
        assert node[node.index("--auth-supernode-private-key") + 1] == f"/keys/supernode-{i}.key"
        # Each node mounts its own private key only.
        mounted = " ".join(svc[f"supernode-{i}"]["volumes"])
        assert f"supernode-{1 - i}.key" not in mounted
    register = svc["register"]["command"]
    assert "/keys/supernode-0.pub" in register and "/keys/supernode-1.pub" in register


def test_dockerfile_installs_every_package_dir() -> None:
    text = DOCKERFILE.read_text()
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M)
    sources = {src.rstrip("/") for line in copies for src in line.split()}
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    assert set(package_dirs.values()) <= sources
    assert "pyproject.toml" in sources
    for source in sources - {"README.md"}:  # README.md: required by pyproject's `readme`
        assert (ROOT / source).exists(), f"COPY {source}: no such path"
    assert "download.pytorch.org/whl/cpu" in text and "torch==${TORCH_VERSION}" in text
    assert re.search(r"^USER\s+\d+", text, re.M), "run as non-root"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text()
    for pattern in ("**/generated/", "**/*.key", "**/*.pem"):
        assert pattern in ignore


# ---------------------------------------------------------------------------- run them


def _write_app(root: Path) -> Path:
    spec = importlib.util.spec_from_file_location(
        "deploy_local_tests", Path(__file__).with_name("test_deploy_local.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_app(root)


def _localize(command: list[str], mounts: dict[str, Path], names: dict[str, str]) -> list[str]:
    """Docker → this machine: executables, mounted paths, network names, ports."""
    argv = []
    for word in command:
        for target, source in mounts.items():
            word = word.replace(target, str(source))
        for docker_name, local in names.items():
            word = word.replace(docker_name, local)
        argv.append(word)
    if argv[0] in FLOWER_COMMANDS:
        argv[0] = str(BIN / argv[0])
    elif argv[0] == "python":
        argv[0] = sys.executable
    return argv


def _wait_port(port: int, proc, timeout_s: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.is_running(), proc.log_tail()
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"port {port} not open: {proc.log_tail()}")


@pytest.mark.integration
def test_compose_command_lines_run_a_federation(tmp_path: Path, generated: Path) -> None:
    svc = services()
    fleet, control = free_port(), free_port()
    names = {
        "0.0.0.0:9092": f"127.0.0.1:{fleet}",
        "superlink:9092": f"127.0.0.1:{fleet}",
        "superlink:8000": f"127.0.0.1:{control}",
        "0.0.0.0": "127.0.0.1",
    }
    work = tmp_path / "work"
    try:
        with LocalFederation(work) as fed:

            def mounts_of(service: str) -> dict[str, Path]:
                state = work / "state" / service
                state.mkdir(parents=True, exist_ok=True)
                result: dict[str, Path] = {}
                for spec in svc[service].get("volumes", []):
                    source, target = _volume_parts(spec)
                    if source.startswith("./"):
                        result[target] = generated / source.removeprefix("./")
                    else:
                        result[target] = state
                return result

            superlink = _localize(svc["superlink"]["command"], mounts_of("superlink"), names)
            superlink[superlink.index("--port") + 1] = str(control)
            link = fed.start_process("superlink", superlink)
            _wait_port(control, link)
            _wait_port(fleet, link)
            ca = generated / "generated/certs/ca.crt"
            fed.superlink_process = link
            fed.superlink = SuperLinkEndpoint(
                fleet_address=f"127.0.0.1:{fleet}",
                control_address=f"127.0.0.1:{control}",
                ca_cert=ca,
                insecure=False,
                supernode_auth=True,
            )
            fed.write_cli_config()
            fed.start_process(
                "serverapp", _localize(svc["serverapp"]["command"], mounts_of("serverapp"), names)
            )
            register = _localize(svc["register"]["command"], mounts_of("register"), names)
            for attempt in range(2):  # the second `up` must succeed as well
                reg = fed.start_process(f"register-{attempt}", register)
                assert reg.wait(120) == 0, reg.log_text()
            assert "already registered" in reg.log_text()
            for i in range(2):
                node = _localize(
                    svc[f"supernode-{i}"]["command"], mounts_of(f"supernode-{i}"), names
                )
                node[node.index("--port") + 1] = str(free_port())
                fed.supernodes[f"supernode-{i}"] = fed.start_process(f"supernode-{i}", node)
            fed.wait_for_nodes(timeout_s=90)

            lines: list[str] = []
            code = fed.run_app(
                _write_app(tmp_path / "app"),
                run_config={"num-server-rounds": 1, "min-nodes": 2},
                timeout_s=150,
                on_line=lines.append,
            )
            output = "\n".join(lines)
            assert code == 0, output[-3000:]
            # Node i adds 1 + i: one round of FedAvg over nodes 0 and 1 gives 1.5.
            assert "FINAL-WEIGHTS [1.5, 1.5, 1.5, 1.5]" in output
            # Process isolation: the SuperLink started no SuperExec of its own, so the
            # ServerApp ran under the `serverapp` service's SuperExec.
            assert "Starting Flower SuperExec" not in link.log_text()
    finally:
        assert_none_under_flwr_home(work)

