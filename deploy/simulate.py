"""Launch a federation in Flower's simulation runtime (Ray backend) and clean up after it.

Everything the run starts (Ray's processes, its workers) is stopped when the run ends,
fails or is interrupted: ray.shutdown() first, then any descendant process still alive.
With ``simulation.ray_address`` the run attaches to an existing Ray cluster instead and
only disconnects from it at the end (the cluster and its nodes keep running).
A Hydra multirun keeps one Ray session for all its jobs (``keep_ray``; starting and
stopping Ray costs about 6 s a job) and stops it when the multirun ends or a job fails.

In-process callers may wrap the simulated nodes' ClientApp in Flower mods for the runs
inside ``with client_mods(...)`` (e.g. the test plug-in's fault injection, which then runs
`fedlora simulate` through deploy/cli.py's ``main``); deployments never are.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from fedlora.task.files import atomic_write

if TYPE_CHECKING:
    from flwr.clientapp.typing import Mod

_log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The federation did not finish; the run directory keeps what completed."""


def prepare_run(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Validate a resolved config (data checks included) and write RUN_DIR/config.yaml."""
    from fedlora.task.config import ConfigError, validate, validate_data
    from fedlora.task.data import partition_sizes
    from fedlora.task.llm import check_llm
    from fedlora.task.memory import check_memory

    job = dict(cfg)
    job.pop("hydra", None)
    job["run_dir"] = str(run_dir)
    # Simulated nodes keep their ledgers under the run directory unless the job names a
    # ledger directory (several runs of one federation then share their budgets).
    job["ledger_dir"] = str(job["privacy"].get("ledger_dir") or run_dir / "privacy")
    validate(job)
    check_llm(job)  # causal LMs: dtype, quantization and DP limits, refused with why
    try:
        sizes = partition_sizes(job)
    except ValueError as exc:  # unreadable data or an impossible split: a config problem
        raise ConfigError(f"invalid configuration:\n  - {exc}") from exc
    validate_data(job, sizes)
    if job["model"].get("check_memory", True):
        check_memory(job, examples=max(sizes))  # one client's peak, against this machine
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(job, run_dir / "config.yaml")
    return job


def write_config(job: dict[str, Any], path: Path) -> None:
    atomic_write(path, OmegaConf.to_yaml(OmegaConf.create(job)).encode("utf-8"))


class _HideRunSimulationNotice(logging.Filter):
    """Flower 1.39 deprecates its in-process run_simulation in favour of `flwr run`, which
    needs a SuperLink that installs the app's dependencies from the network: impossible
    offline, so fedlora keeps the in-process runtime and hides that one notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("DEPRECATED FEATURE")
                    and "run_simulation" in str(record.args))


# The Ray init arguments of a session kept alive for the next job of a multirun.
_kept_session: dict[str, Any] | None = None
# The Flower mods the simulated nodes' ClientApp runs under (client_mods()).
_client_mods: tuple[Mod, ...] = ()


@contextmanager
def client_mods(*mods: Mod) -> Iterator[None]:
    """Run every simulation started in this scope (this process: the jobs of a `fedlora
    simulate` multirun and `fedlora resume` included) with its ClientApp wrapped in
    ``mods`` (client/app.py's make_client_app: the first outermost, inside any mods of
    an enclosing scope). Mods reach the Ray workers pickled: module-level functions or
    instances of importable classes. For tests and tools that observe or perturb what
    simulated nodes send; a deployment's ClientApp is never wrapped."""
    global _client_mods
    outer = _client_mods
    _client_mods = (*outer, *mods)
    try:
        yield
    finally:
        _client_mods = outer


@contextmanager
def _ray_shutdown_deferred():
    """Flower's Ray backend ends every run with ray.shutdown(), which a multirun's next job
    would pay for again; while this is active that call is skipped (the run's actors are
    still killed by the backend) and the caller decides when Ray stops."""
    import ray

    real_shutdown = ray.shutdown
    ray.shutdown = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ray.shutdown = real_shutdown


def run_simulation(job: dict[str, Any], *, resume: bool = False, keep_ray: bool = False) -> None:
    """Run the job's federation with Flower's simulation runtime; raise RunFailed on failure.

    keep_ray: leave the Ray session running for another job with the same resources (a
    multirun); the caller ends it with stop_everything(). A failed run always stops it.
    """
    global _kept_session
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedlora.deploy.vce_delivery import cohort_delivery

    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _HideRunSimulationNotice) for f in flwr_logger.filters):
        flwr_logger.addFilter(_HideRunSimulationNotice())

    from fedlora.client.app import app, make_client_app
    from fedlora.server.app import run_server

    client_app = make_client_app(_client_mods) if _client_mods else app

    outcome: dict[str, Any] = {}
    from flwr.serverapp import ServerApp

    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:  # noqa: ANN001 - Flower's signature
        del context
        try:
            outcome["summary"] = run_server(grid, job, resume=resume)
        except BaseException as exc:  # recorded, then re-raised into Flower's handler
            outcome["error"] = exc
            raise

    sim = job.get("simulation") or {}
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": float(sim.get("num_cpus_per_client", 1)),
                             "num_gpus": float(sim.get("num_gpus_per_client", 0.0))},
        "init_args": {"include_dashboard": False},
    }
    address = sim.get("ray_address")
    if address:  # an existing cluster: its nodes decide the resources
        backend["init_args"] = {"address": str(address)}
    elif sim.get("num_cpus"):
        backend["init_args"]["num_cpus"] = int(sim["num_cpus"])
    if _kept_session is not None and _kept_session != backend["init_args"]:
        stop_everything()  # a job asking for other resources gets a fresh session
    # Ctrl-C must end the whole command (a Hydra multirun too), whatever the runtime's
    # threads make of the KeyboardInterrupt: remember it and raise it again at the end.
    interrupted = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):  # noqa: ANN001 - signal handler signature
        interrupted.set()
        raise KeyboardInterrupt

    # The simulated nodes (Ray workers inherit this process's environment) may honour
    # job-level declarations that a deployed node leaves to its data owner.
    from fedlora.client.node import SIMULATION_ENV

    previous_env = os.environ.get(SIMULATION_ENV)
    os.environ[SIMULATION_ENV] = "1"
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGINT, on_sigint)
    finished = False
    try:
        if address:
            _attach(str(address))
        with _ray_shutdown_deferred() if keep_ray else nullcontext(), cohort_delivery():
            flwr_run_simulation(server_app=server_app, client_app=client_app,
                                num_supernodes=int(job["federation"]["num_clients"]),
                                backend_config=backend)
        finished = "summary" in outcome and not interrupted.is_set()
    finally:
        if keep_ray and finished:
            _kept_session = dict(backend["init_args"])
            import ray

            print(f"[fedlora] Ray node {ray.get_runtime_context().get_node_id()[:12]} kept "
                  "for the multirun's next job", flush=True)
        else:
            stop_everything()
        if previous_env is None:  # this process is not a simulated node once the run ends
            os.environ.pop(SIMULATION_ENV, None)
        else:
            os.environ[SIMULATION_ENV] = previous_env
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    if interrupted.is_set():
        raise KeyboardInterrupt
    if "error" in outcome:
        raise RunFailed(f"the federation failed: {outcome['error']!r}") from outcome["error"]
    if "summary" not in outcome:
        raise RunFailed("the federation stopped before finishing (see the log above)")


def _attach(address: str) -> None:
    """Connect this driver to an existing Ray cluster before Flower's backend would.

    Workers of an existing cluster are started by its raylets, not by this process, so
    they do not inherit its environment: the variables simulated nodes read (and the
    PYTHONPATH Flower passes) travel in the job's runtime_env instead. Flower's backend
    then finds Ray initialized and only builds its actor pool; ray.shutdown() at the end
    disconnects the driver and leaves the cluster running."""
    import ray

    from fedlora.client.node import SIMULATION_ENV

    if ray.is_initialized():
        return  # a multirun's kept session, already attached
    pythonpath = os.pathsep.join(p for p in [*sys.path, os.environ.get("PYTHONPATH", "")] if p)
    env = {"PYTHONPATH": pythonpath, SIMULATION_ENV: os.environ.get(SIMULATION_ENV, "1")}
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(float(n.get("Resources", {}).get("CPU", 0)) for n in nodes)
    print(f"[fedlora] attached to the Ray cluster at {address}: {len(nodes)} nodes, "
          f"{cpus:g} CPUs", flush=True)


def stop_everything() -> None:
    """Stop Ray and any process this one started that is still running."""
    global _kept_session
    _kept_session = None
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception as exc:  # noqa: BLE001 - best effort; the sweep below still runs
        _log.warning("ray.shutdown failed: %s", exc)
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with ray
        return
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    sys.stdout.flush()
