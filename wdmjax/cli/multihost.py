"""The flags that join a command to a multi-host run (see `wdmjax.train.distributed`)."""

from __future__ import annotations

import argparse

from wdmjax.train.distributed import INIT_TIMEOUT, initialize


def add_distributed_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group(
    "multi-host", "run one copy of the command per host; on Cloud TPU pods, SLURM and Open "
    "MPI the processes find each other, elsewhere give all three of --coordinator, "
    "--num-processes and --process-id")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="address of process 0's coordination service")
  g.add_argument("--num-processes", type=int, default=None, help="processes in the run")
  g.add_argument("--process-id", type=int, default=None, help="this process's index")
  g.add_argument("--heartbeat-timeout", type=int, default=100, metavar="SECONDS",
                 help="a process silent this long counts as dead and the others stop with an "
                      "error (default 100)")
  g.add_argument("--init-timeout", type=int, default=INIT_TIMEOUT, metavar="SECONDS",
                 help="how long the processes wait for each other to start; processes that "
                      f"disagree on the run fail at once (default {INIT_TIMEOUT})")


def connect(args: argparse.Namespace) -> None:
  """Joins the run described by the flags (a no-op for a single process)."""
  initialize(args.coordinator, args.num_processes, args.process_id,
             heartbeat_timeout=args.heartbeat_timeout, initialization_timeout=args.init_timeout)
