#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the SLURM tests (tests/test_slurm.py).
#   .ci/slurm.sh start   install (Debian packages) if needed, configure, start munged/slurmctld/slurmd, wait idle
#   .ci/slurm.sh stop    stop the three daemons by the PIDs in their pid files
# The node is "localhost" with every CPU, ~85% of the memory and one GPU GRES backed by /dev/null,
# so jobs that ask for a GPU are scheduled (bookkeeping only: torch sees no GPU). No accounting
# database: Snakemake's profile asks squeue for job states (slurm/config.yaml), and finished jobs
# stay visible to squeue for an hour (MinJobAge), so the tests can inspect them.
set -euo pipefail
conf=/etc/slurm

running() {  # is the daemon of this pid file alive?
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2> /dev/null
}

start() {
    if ! command -v slurmctld > /dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge > /dev/null
    fi
    mkdir -p "$conf" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
    chown slurm: /var/spool/slurmctld /var/log/slurm
    chown munge: /run/munge
    local cpus mem
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.85}' /proc/meminfo)
    cat > "$conf/slurm.conf" <<EOF
ClusterName=ect-ci
SlurmctldHost=localhost
SlurmUser=slurm
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=3600
GresTypes=gpu
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    echo "Name=gpu File=/dev/null" > "$conf/gres.conf"
    running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
    running /run/slurmctld.pid || /usr/sbin/slurmctld
    running /run/slurmd.pid || /usr/sbin/slurmd -N localhost
    for _ in $(seq 60); do
        [ "$(sinfo -h -n localhost -o %T 2> /dev/null)" = idle ] && { echo "slurm: node idle"; return 0; }
        sleep 1
    done
    echo "slurm: node not idle after 60 s" >&2
    tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    return 1
}

stop() {
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2> /dev/null || true
    done
}

"$1"
