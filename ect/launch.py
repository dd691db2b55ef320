"""The per-node launcher of a multi-node tune job.

The tune rule of a run with ``resources.tune.nodes`` > 1 runs ``srun`` with one task on each node of its
allocation; each task is this module, which turns SLURM's view of the step into one torchrun agent: every
agent meets the others at a c10d rendezvous on the step's first node, and starts one training process per
GPU of its node (one on a node without GPUs). Usage (what the rule runs, after srun)::

    python -m ect.launch --nproc-per-node 4 -- tune --config ... (the arguments of `ect tune`)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

# The rendezvous port: fixed per job (derived from its id) so that two jobs sharing a first node do not
# collide, and inside the range SLURM leaves to user processes.
RENDEZVOUS_PORT_BASE, RENDEZVOUS_PORTS = 29500, 2000
# SLURM warns a job before its time limit with SIGUSR1 (--signal=USR1@300): the agent forwards it to
# the trainers, which save their state and stop, rather than dying of it.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")  # what torchrun accepts as the rendezvous host


class LaunchError(Exception):
    pass


def first_node(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[01-04],gpu7``), as SLURM itself expands it."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise LaunchError(f"cannot expand the node list {nodelist!r} with scontrol: {exc}") from None
    if not out or not HOSTNAME.fullmatch(out[0]):
        raise LaunchError(f"scontrol expanded the node list {nodelist[:200]!r} to no host name the rendezvous can use")
    return out[0]


def torchrun_command(env: dict, nproc_per_node: int, ect_args: list[str], head: str | None = None) -> list[str]:
    """The torchrun line of this node's agent, from the variables srun sets in each task."""
    try:
        nodes, job = int(env["SLURM_STEP_NUM_NODES"]), int(env["SLURM_JOB_ID"])
        nodelist = env["SLURM_STEP_NODELIST"]
    except (KeyError, ValueError):
        raise LaunchError("run under srun (one task a node): SLURM_STEP_NUM_NODES, SLURM_STEP_NODELIST and "
                          "SLURM_JOB_ID must be set") from None
    head = head or first_node(nodelist)
    port = RENDEZVOUS_PORT_BASE + job % RENDEZVOUS_PORTS
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={head}:{port}", f"--rdzv-id=ect-{job}",
            f"--signals-to-handle={FORWARDED_SIGNALS}", "--max-restarts=0", "-m", "ect.cli", *ect_args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ect.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc-per-node", type=int, required=True, help="training processes on each node")
    parser.add_argument("ect_args", nargs=argparse.REMAINDER, help="-- then the arguments of `ect`")
    args = parser.parse_args(argv)
    ect_args = args.ect_args[1:] if args.ect_args[:1] == ["--"] else args.ect_args
    if args.nproc_per_node < 1 or not ect_args:
        parser.error("--nproc-per-node must be at least 1, and the arguments of `ect` follow --")
    try:
        command = torchrun_command(dict(os.environ), args.nproc_per_node, ect_args)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"ect.launch: node {os.environ.get('SLURM_NODEID', '?')} on {os.uname().nodename}: {' '.join(command)}",
          file=sys.stderr, flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
