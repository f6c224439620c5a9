"""Multi-host runs on JAX's own multi-controller runtime (`jax.distributed`).

Every host runs the same command; `initialize` connects them before any JAX computation.
On Cloud TPU pods, SLURM and Open MPI, JAX finds the coordinator, the process count and this
process's id by itself; elsewhere (several processes on one machine, a hand-made cluster)
they are given explicitly, e.g. `--coordinator 10.0.0.2:8476 --num-processes 4
--process-id 1`. On CPU the processes talk over gloo.

When a process dies, the coordination service stops hearing its heartbeats and, after
`heartbeat_timeout` seconds, terminates every other process with "another task died"; a
survivor blocked in a collective with a dead peer fails at once with a gloo/NCCL error. So a
crashed worker never leaves the others hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import sys
import time

import jax
from jax.experimental import multihost_utils

from wdmjax.errors import WdmjaxError, check


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  index: int
  count: int
  how: str  # "single", "explicit" or the detected cluster

  @property
  def is_main(self) -> bool:
    return self.index == 0


def detect_cluster() -> str | None:
  """The cluster kind JAX can auto-configure from this environment, if there is one with more
  than one process (a 1-task SLURM job needs no coordination)."""
  env = os.environ
  if env.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 or env.get(
      "MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU pod"
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return "SLURM"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  return _cloud_tpu_vm()


def _cloud_tpu_vm() -> str | None:
  """A Cloud TPU VM, found the way JAX finds it: its workers are listed by the VM's metadata
  server, not in the environment, so this asks JAX's own detectors (a private module, hence
  guarded: without it, pass the three flags)."""
  try:
    from jax._src import cloud_tpu_init, clusters  # private: may be gone, hence guarded

    if not cloud_tpu_init.running_in_cloud_tpu_vm:
      return None
    for env in clusters.ClusterEnv._cluster_types:
      if "tpu" in env.name.lower() and not env.opt_in_only_method and env.is_env_present():
        return "Cloud TPU VM"
  except Exception:  # a JAX without these internals, or no metadata server
    return None
  return None


INIT_TIMEOUT = 60  # seconds for the processes of a run to meet (JAX's own default: 300)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout: int = 100,
               initialization_timeout: int = INIT_TIMEOUT) -> ProcessInfo:
  """Connects this process to the others of the run (a no-op for a single process).

  Args:
    coordinator: `host:port` of process 0's coordination service; with `num_processes` and
      `process_id`, or none of the three (auto-detection on TPU pods, SLURM, Open MPI).
    num_processes: the number of processes P >= 1.
    process_id: this process's index in [0, P).
    heartbeat_timeout: seconds without a heartbeat after which a process counts as dead and
      the others are stopped with an error.
    initialization_timeout: seconds to wait for every process to connect.

  With explicit arguments the processes first meet in `rendezvous`, so that a disagreement
  (two processes with one id, different process counts) or a missing process fails every
  process with a one-line WdmjaxError instead of JAX's timeout and C++ abort. Must run
  before any JAX computation; calling it again is a no-op.
  """
  given = [coordinator is not None, num_processes is not None, process_id is not None]
  check(all(given) or not any(given),
        "coordinator, num_processes, process_id: expected all three or none "
        f"(auto-detection), got coordinator={coordinator!r}, num_processes={num_processes!r}, "
        f"process_id={process_id!r}")
  check(isinstance(heartbeat_timeout, int) and heartbeat_timeout >= 1,
        f"heartbeat_timeout: expected a whole number of seconds >= 1, got {heartbeat_timeout!r}")
  check(isinstance(initialization_timeout, int) and not isinstance(initialization_timeout, bool)
        and initialization_timeout >= 1, f"initialization_timeout: expected a whole number of "
                                         f"seconds >= 1, got {initialization_timeout!r}")
  if jax.distributed.is_initialized():
    return ProcessInfo(jax.process_index(), jax.process_count(), "already initialized")
  kwargs = dict(heartbeat_timeout_seconds=heartbeat_timeout,
                initialization_timeout=initialization_timeout)
  if all(given):
    check(isinstance(coordinator, str) and re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator),
          f"coordinator: expected HOST:PORT, got {coordinator!r}")
    check(isinstance(num_processes, int) and num_processes >= 1,
          f"num_processes: expected an integer >= 1, got {num_processes!r}")
    check(isinstance(process_id, int) and 0 <= process_id < num_processes,
          f"process_id: expected an integer in [0, {num_processes}), got {process_id!r}")
    if num_processes == 1:
      return ProcessInfo(0, 1, "single")
    _announce(f"process {process_id} of {num_processes}: joining the run at {coordinator}",
              initialization_timeout)
    rendezvous(coordinator, num_processes, process_id, initialization_timeout)
    _use_gloo_on_cpu()
    jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
    check(jax.process_count() == num_processes and jax.process_index() == process_id,
          f"num_processes, process_id: expected process {process_id} of {num_processes}, "
          f"got process {jax.process_index()} of {jax.process_count()} from the coordinator "
          f"{coordinator}")
    return ProcessInfo(jax.process_index(), jax.process_count(), "explicit")
  cluster = detect_cluster()
  if cluster is None:
    return ProcessInfo(0, 1, "single")
  _use_gloo_on_cpu()
  _announce(f"joining the {cluster} run", initialization_timeout)
  jax.distributed.initialize(**kwargs)
  return ProcessInfo(jax.process_index(), jax.process_count(), cluster)


def _split_address(coordinator: str) -> tuple[str, int]:
  host, _, port = coordinator.rpartition(":")
  check(0 < int(port) < 65536, f"coordinator: expected HOST:PORT with a port in [1, 65535], "
                               f"got {coordinator!r}")
  return host.strip("[]"), int(port)


def _recv_line(sock: socket.socket, deadline: float) -> bytes | None:
  """One newline-terminated message (at most 4 KiB), or None at EOF, timeout or garbage."""
  data = b""
  while not data.endswith(b"\n") and len(data) < 4096:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return None
    sock.settimeout(remaining)
    try:
      chunk = sock.recv(4096)
    except OSError:
      return None
    if not chunk:
      return None
    data += chunk
  return data if data.endswith(b"\n") else None


def _send(sock: socket.socket, message: dict) -> None:
  with contextlib.suppress(OSError):
    sock.sendall(json.dumps(message).encode() + b"\n")


def rendezvous(coordinator: str, num_processes: int, process_id: int, timeout: float) -> None:
  """Checks that the `num_processes` processes of a run agree before JAX connects them.

  Process 0 listens on the coordinator's port (JAX's coordination service takes it over
  afterwards); every other process sends it its process id and count. Process 0 answers all
  of them at once: go, or the first disagreement (a count that differs from process 0's, an
  id given twice, a process missing after `timeout` seconds), which every process then
  raises as one WdmjaxError. Without it JAX waits out its timeout and aborts with a C++ stack.
  """
  host, port = _split_address(coordinator)
  deadline = time.monotonic() + timeout
  if process_id != 0:
    _join(host, port, coordinator, num_processes, process_id, timeout, deadline)
    return
  try:
    if socket.has_dualstack_ipv6():
      server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
      server = socket.create_server(("", port))
  except OSError as e:
    why = os.strerror(e.errno) if e.errno else str(e)
    raise WdmjaxError(f"coordinator: expected a free port {port} on process 0's host, got "
                      f"{why} (is another process of the run also process 0?)") from None
  ids: set[int] = set()
  peers: list[socket.socket] = []
  error = None
  with server:
    while error is None and len(ids) < num_processes - 1:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        missing = sorted(set(range(1, num_processes)) - ids)
        error = (f"coordinator: expected {num_processes} processes at {coordinator} within "
                 f"{timeout:g} s, got {len(ids) + 1} (missing process ids {missing}); start "
                 f"every process with the same coordinator and process count and its own id")
        break
      server.settimeout(remaining)
      try:
        conn, _ = server.accept()
      except OSError:
        continue
      try:
        hello = json.loads(_recv_line(conn, min(deadline, time.monotonic() + 10)) or b"")
        pid, n = int(hello["process_id"]), int(hello["num_processes"])
      except (ValueError, KeyError, TypeError):  # not one of ours: ignore it
        conn.close()
        continue
      peers.append(conn)
      if n != num_processes:
        error = (f"num_processes: expected the same process count in every process, got "
                 f"{num_processes} in process 0 and {n} in process {pid}")
      elif pid in ids or not 0 < pid < num_processes:
        error = (f"process_id: expected a different id in every process, got {pid} in two "
                 f"processes")
      ids.add(pid)
    for conn in peers:
      _send(conn, {"error": error} if error else {"ok": True})
    for conn in peers:  # the peers close first: no TIME_WAIT on the coordinator port
      _recv_line(conn, time.monotonic() + 5)
      conn.close()
  check(error is None, error or "")


def _join(host: str, port: int, coordinator: str, num_processes: int, process_id: int,
          timeout: float, deadline: float) -> None:
  """The side of `rendezvous` of a process other than 0."""
  while True:
    try:
      sock = socket.create_connection((host, port), timeout=max(deadline - time.monotonic(),
                                                                0.1))
      break
    except OSError as e:
      if time.monotonic() >= deadline:
        raise WdmjaxError(f"coordinator: expected process 0 of the run at {coordinator} "
                          f"within {timeout:g} s, got {e.strerror or e}") from None
      time.sleep(0.2)
  with sock:
    _send(sock, {"process_id": process_id, "num_processes": num_processes})
    # process 0 was listening before this connection, so it answers at the latest `timeout`
    # seconds from now (its own deadline), whenever this process started
    reply = _recv_line(sock, time.monotonic() + timeout + 10)
  try:
    answer = json.loads(reply or b"")
  except ValueError:  # no answer: process 0 had all its processes, or is not listening
    answer = {"error": f"process_id: expected process 0 at {coordinator} to admit process "
                       f"{process_id} within {timeout:g} s, got no answer (does another "
                       f"process have id {process_id}?)"}
  check(bool(answer.get("ok")), str(answer.get("error")))


def _announce(what: str, timeout: int) -> None:
  # JAX aborts the process (no Python exception) when the others do not connect in time,
  # so say beforehand what is being waited for.
  print(f"wdmjax: {what}; waiting up to {timeout} s for every process to connect",
        file=sys.stderr, flush=True)


def exit_run(code: int = 0) -> None:
  """Ends this process of a finished multi-process run (returns for a single process).

  JAX's own teardown at interpreter exit can abort process 0 (a check failure in the
  coordination service's gRPC server when a peer's request is still in flight), turning a
  finished, saved run into exit status -6. So the processes meet at a barrier, the others
  exit at once and process 0, which hosts the service, exits a moment later. Call it only
  after every process has finished its work (a barrier with a failed peer would wait).
  """
  if jax.process_count() == 1 or not jax.distributed.is_initialized():
    return
  multihost_utils.sync_global_devices("wdmjax: exit")
  sys.stdout.flush()
  sys.stderr.flush()
  if jax.process_index() == 0:
    time.sleep(1.0)
  os._exit(code)


def _use_gloo_on_cpu() -> None:
  # Cross-process collectives of the CPU backend; GPU (NCCL) and TPU (ICI/DCN) ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
