#!/usr/bin/env bash
# A real SLURM on this machine, for the SLURM tests (tests/test_slurm.py, tests/test_cluster.py).
#   .ci/slurm.sh start   install (Debian packages) if needed, configure, start munged, slurmctld and three
#                        slurmd, wait until every node is idle
#   .ci/slurm.sh stop    stop the daemons by the PIDs in their pid files, remove the network namespaces
# Partition "debug" (the default) is one node, node0, in this machine's namespaces: every CPU, ~40% of the memory and one GPU GRES
# backed by /dev/null, so jobs that ask for a GPU are scheduled (bookkeeping only: torch sees no GPU).
# Partition "two" is two nodes, node1 and node2, each a slurmd in its own network namespace (a veth pair on
# a bridge, the addresses below) and its own UTS namespace (its own hostname): a job over both runs on two
# hosts as SLURM, srun and torch.distributed see them, sharing this machine's filesystem as cluster nodes
# share theirs. No accounting database: Snakemake's profile asks squeue for job states (slurm/config.yaml),
# and finished jobs stay visible to squeue for an hour (MinJobAge), so the tests can inspect them.
# (A node may not be called localhost beside others: slurmctld refuses the config, "Duplicated NodeHostName".)
set -euo pipefail
conf=/etc/slurm
bridge=ectbr0 controller=10.77.0.1
nodes=(node1 node2) addresses=(10.77.0.11 10.77.0.12)

running() {  # is the daemon of this pid file alive?
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2> /dev/null
}

network() {  # a bridge holding the controller's address; a namespace a node, joined to it by a veth pair
    ip link show "$bridge" > /dev/null 2>&1 || {
        ip link add "$bridge" type bridge
        ip addr add "$controller/24" dev "$bridge"
        ip link set "$bridge" up
    }
    local i ns
    for i in 0 1; do
        ns="ect-${nodes[$i]}"
        ip netns list | grep -qw "$ns" && continue
        ip netns add "$ns"
        ip link add "ect-veth$i" type veth peer name eth0 netns "$ns"
        ip link set "ect-veth$i" master "$bridge" up
        ip -n "$ns" addr add "${addresses[$i]}/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        # srun and torch.distributed resolve node names (the c10d rendezvous is on the job's first node)
        grep -qw "${nodes[$i]}" /etc/hosts || echo "${addresses[$i]} ${nodes[$i]}" >> /etc/hosts
    done
}

start() {
    if ! command -v slurmctld > /dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge > /dev/null
    fi
    network
    mkdir -p "$conf" /var/spool/slurmctld /var/log/slurm /run/munge
    local node
    for node in node0 "${nodes[@]}"; do mkdir -p "/var/spool/slurmd/$node"; done
    chown slurm: /var/spool/slurmctld /var/log/slurm
    chown munge: /run/munge
    local cpus mem node_mem
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.40}' /proc/meminfo)
    node_mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.20}' /proc/meminfo)
    cat > "$conf/slurm.conf" <<EOF
ClusterName=ect-ci
SlurmctldHost=localhost($controller)
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
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
NodeName=node0 NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
NodeName=${nodes[0]} NodeAddr=${addresses[0]} CPUs=$cpus RealMemory=$node_mem State=UNKNOWN
NodeName=${nodes[1]} NodeAddr=${addresses[1]} CPUs=$cpus RealMemory=$node_mem State=UNKNOWN
PartitionName=debug Nodes=node0 Default=YES MaxTime=INFINITE State=UP
PartitionName=two Nodes=${nodes[0]},${nodes[1]} MaxTime=INFINITE State=UP
EOF
    echo "Name=gpu File=/dev/null" > "$conf/gres.conf"
    running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
    running /run/slurmctld.pid || /usr/sbin/slurmctld
    running /run/slurmd-node0.pid || /usr/sbin/slurmd -N node0
    local i
    for i in 0 1; do  # each node's slurmd inside its namespaces, under its own hostname
        # (nsenter, not `ip netns exec`: that remounts /sys, and slurmd needs the cgroup filesystem under it)
        running "/run/slurmd-${nodes[$i]}.pid" || unshare --uts nsenter --net="/run/netns/ect-${nodes[$i]}" \
            sh -c "hostname ${nodes[$i]} && exec /usr/sbin/slurmd -N ${nodes[$i]}"
    done
    for _ in $(seq 60); do
        [ "$(sinfo -h -o %T | sort -u)" = idle ] && { echo "slurm: nodes idle: node0 (partition debug), ${nodes[*]} (partition two)"; return 0; }
        sleep 1
    done
    echo "slurm: nodes not idle after 60 s" >&2
    sinfo >&2 || true
    tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-*.log >&2 || true
    return 1
}

stop() {
    local pidfile node
    for pidfile in /run/slurmd-*.pid /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2> /dev/null || true
    done
    for node in "${nodes[@]}"; do ip netns del "ect-$node" 2> /dev/null || true; done
    ip link del "$bridge" 2> /dev/null || true
}

"$1"
