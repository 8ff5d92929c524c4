#!/usr/bin/env bash
# Start a single-node SLURM cluster on localhost for sparsebench's cluster
# integration test (tests/test_cluster.py).
#
#   tests/cluster/start_slurm.sh      # start (or find running) and print SLURM_CONF
#   tests/cluster/stop_slurm.sh       # stop exactly the daemons started here
#
# Installs Debian's `slurm-wlm` and `munge` with apt-get when `sbatch` is
# missing. There is no systemd here: `munged`, `slurmctld` and `slurmd` are
# started directly, in the foreground of a background process, and their pids
# are recorded under the state folder, so stop_slurm.sh stops those and
# nothing else. Everything generated (slurm.conf, gres.conf, the munge key and
# socket, spool, logs) lives in the state folder, never in the repository:
#
#   $SPARSEBENCH_SLURM_DIR            (default: ${TMPDIR:-/tmp}/sparsebench-slurm)
#
# Idempotent: when the daemons recorded there are alive and answering, it
# prints where the cluster is and exits. /etc/slurm/slurm.conf is pointed at
# the generated config (a symlink) when no slurm.conf exists there, so that
# plain `sbatch`/`squeue` work in any shell; otherwise export SLURM_CONF.
#
# The partition is "debug" (tests/cluster/profile names it). Settings (environment):
# SPARSEBENCH_SLURM_GPUS (fake GPUs on the node, 1-5, default 2: two train jobs at once),
# SPARSEBENCH_SLURM_CTLD_PORT / _SLURMD_PORT (default 6817 / 6818).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/cluster/common.sh
source "$here/common.sh"  # state, conf, program_of, pid_of
partition=debug
gpus="${SPARSEBENCH_SLURM_GPUS:-2}"
ctld_port="${SPARSEBENCH_SLURM_CTLD_PORT:-6817}"
slurmd_port="${SPARSEBENCH_SLURM_SLURMD_PORT:-6818}"

log() { echo "start_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Whether a recorded daemon is alive and still runs the program we started.
alive() { pid_of "$1" >/dev/null; }

# Start a daemon in the foreground of a background process; record its pid.
launch() {
    local name="$1"
    shift
    local pid
    nohup "$@" </dev/null >>"$state/log/$name.out" 2>&1 &
    pid=$!
    echo "$pid" >"$state/pids/$name"
    # Until the fork has exec'd, the pid still shows this script.
    for _ in $(seq 100); do
        [ "$(program_of "$pid")" = "$name" ] && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    die "$name did not start; see $state/log/$name.out"
}

# --- already running? -------------------------------------------------------
if alive munged && alive slurmctld && alive slurmd \
    && SLURM_CONF="$conf" scontrol ping >/dev/null 2>&1; then
    log "already running (state: $state)"
    echo "SLURM_CONF=$conf"
    exit 0
fi
if compgen -G "$state/pids/*" >/dev/null; then
    log "stale or partial cluster in $state: stopping what it recorded"
    SPARSEBENCH_SLURM_DIR="$state" "$here/stop_slurm.sh"
fi

# --- packages ----------------------------------------------------------------
if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null \
    || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" -eq 0 ] || die "sbatch is missing and installing slurm-wlm needs root"
    command -v apt-get >/dev/null || die "sbatch is missing and there is no apt-get"
    log "installing slurm-wlm and munge with apt-get"
    # Package scripts try to start the services; a policy-rc.d that exits 101
    # forbids that. Only where none exists, and removed afterwards.
    policy=/usr/sbin/policy-rc.d
    made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            slurm-wlm munge >"${TMPDIR:-/tmp}/sparsebench-slurm-apt.log" 2>&1
    }
    rc=0
    install || { apt-get update -q >/dev/null 2>&1 && install; } || rc=$?
    [ -z "$made_policy" ] || rm -f "$policy"
    [ "$rc" -eq 0 ] || die "apt-get install failed; see ${TMPDIR:-/tmp}/sparsebench-slurm-apt.log"
fi

# --- state folder ------------------------------------------------------------
rm -rf "$state"
mkdir -p "$state"/{pids,log,ctld,slurmd,munge}
chmod 755 "$state"
chmod 711 "$state/munge"

# On any failure from here on, stop what was started.
trap 'rc=$?; [ "$rc" -eq 0 ] || SPARSEBENCH_SLURM_DIR="$state" "$here/stop_slurm.sh"' EXIT

host="$(hostname -s)"
cpus="$(nproc)"
# Leave a little memory to the system; at least 1 GB for the node.
mem_mb="$(awk '/^MemTotal:/ { m = int($2 / 1024 * 0.9); print (m < 1024 ? 1024 : m) }' /proc/meminfo)"

sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$state|g" -e "s|@CPUS@|$cpus|g" \
    -e "s|@MEM_MB@|$mem_mb|g" -e "s|@GPUS@|$gpus|g" -e "s|@PARTITION@|$partition|g" \
    -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" \
    "$here/slurm.conf.in" >"$conf"
# Fake GPUs: slurmd drops file-less GPUs ("Removing file-less GPU"), so each
# one is backed by a harmless character device; slurm then hands jobs a
# CUDA_VISIBLE_DEVICES index as on a real GPU node (see slurm.conf.in).
fake_devices=(/dev/null /dev/zero /dev/full /dev/urandom /dev/random)
if ! [[ "$gpus" =~ ^[0-9]+$ ]] || [ "$gpus" -lt 1 ] || [ "$gpus" -gt "${#fake_devices[@]}" ]; then
    die "SPARSEBENCH_SLURM_GPUS must be 1..${#fake_devices[@]}, not '$gpus'"
fi
files="$(IFS=,; echo "${fake_devices[*]:0:$gpus}")"
echo "NodeName=$host Name=gpu File=$files" >"$state/gres.conf"
echo "SLURM_CONF=$conf" >"$state/env"

# --- munged (our own key and socket) -----------------------------------------
dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$state/munge/munge.key"
launch munged munged --foreground --force \
    --key-file="$state/munge/munge.key" \
    --socket="$state/munge/munge.socket" \
    --pid-file="$state/munge/munged.pid" \
    --seed-file="$state/munge/munge.seed" \
    --log-file="$state/log/munged.log"
for _ in $(seq 50); do
    [ -S "$state/munge/munge.socket" ] && break
    alive munged || die "munged exited; see $state/log/munged.log"
    sleep 0.1
done
[ -S "$state/munge/munge.socket" ] || die "munged did not open its socket"

# --- slurmctld, slurmd ---------------------------------------------------------
export SLURM_CONF="$conf"
launch slurmctld slurmctld -D -f "$conf"
for _ in $(seq 100); do
    scontrol ping >/dev/null 2>&1 && break
    alive slurmctld || die "slurmctld exited; see $state/log/slurmctld.log"
    sleep 0.1
done
launch slurmd slurmd -D -f "$conf" -N "$host"

# Wait for the node to register and become idle.
node_state=""
for _ in $(seq 200); do
    alive slurmd || die "slurmd exited; see $state/log/slurmd.log"
    node_state="$(sinfo -h -n "$host" -o %T 2>/dev/null || true)"
    case "$node_state" in
        idle* | mixed* | allocated*) break ;;
        down* | drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.1
done
case "$node_state" in
    idle* | mixed* | allocated*) ;;
    *) die "node $host is '${node_state:-unknown}'; see $state/log/slurmd.log" ;;
esac

# Let plain sbatch/squeue find this cluster, unless a slurm.conf is there.
if [ -w /etc/slurm ] || { [ "$(id -u)" -eq 0 ] && mkdir -p /etc/slurm; }; then
    if [ ! -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
        ln -s "$conf" /etc/slurm/slurm.conf
        echo /etc/slurm/slurm.conf >"$state/etc-link"
    fi
fi

log "up: node $host ($cpus CPUs, $mem_mb MB, gpu:$gpus fake), partition '$partition', state $state"
echo "SLURM_CONF=$conf"
