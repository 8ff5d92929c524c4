#!/usr/bin/env bash
# Stop the single-node SLURM started by tests/cluster/start_slurm.sh: cancel
# the jobs of that cluster, then stop exactly the daemons whose pids it
# recorded (checking each pid still runs that program), and remove the
# /etc/slurm/slurm.conf symlink if start_slurm.sh made it. Safe to run when
# nothing is running. The state folder is kept (logs) until the next start.
set -uo pipefail

state="${SPARSEBENCH_SLURM_DIR:-${TMPDIR:-/tmp}/sparsebench-slurm}"
conf="$state/slurm.conf"
[ -d "$state/pids" ] || exit 0

# The program a pid runs: argv[0]'s basename, looking through `nohup`.
program_of() {
    local args
    mapfile -d '' -t args <"/proc/$1/cmdline" 2>/dev/null || return 1
    [ "${#args[@]}" -gt 0 ] || return 1
    if [ "$(basename "${args[0]}")" = nohup ] && [ "${#args[@]}" -gt 1 ]; then
        basename "${args[1]}"
    else
        basename "${args[0]}"
    fi
}

# A recorded pid, if it is alive and still runs the program start_slurm.sh started.
pid_of() {
    local name="$1" pid
    [ -s "$state/pids/$name" ] || return 1
    pid="$(cat "$state/pids/$name")"
    kill -0 "$pid" 2>/dev/null || return 1
    [ "$(program_of "$pid")" = "$name" ] || return 1
    echo "$pid"
}

# Jobs still on this cluster (their slurmstepd outlive slurmd otherwise).
if pid_of slurmctld >/dev/null && command -v squeue >/dev/null; then
    jobs="$(SLURM_CONF="$conf" squeue -h -t PD,R,CG,S -o %i 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        SLURM_CONF="$conf" scancel $jobs 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(SLURM_CONF="$conf" squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

for name in slurmd slurmctld munged; do
    pid="$(pid_of "$name")" || { rm -f "$state/pids/$name"; continue; }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "stop_slurm: $name ($pid) ignored SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$state/pids/$name"
done

if [ -s "$state/etc-link" ]; then
    link="$(cat "$state/etc-link")"
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$conf" ]; then
        rm -f "$link"
    fi
    rm -f "$state/etc-link"
fi
rmdir "$state/pids" 2>/dev/null || true
echo "stop_slurm: stopped (state kept in $state)" >&2
