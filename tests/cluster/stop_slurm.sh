#!/usr/bin/env bash
# Stop the single-node SLURM started by tests/cluster/start_slurm.sh: cancel
# the jobs of that cluster, then stop exactly the daemons whose pids it
# recorded (checking each pid still runs that program), and remove the
# /etc/slurm/slurm.conf symlink if start_slurm.sh made it. Safe to run when
# nothing is running. The state folder is kept (logs) until the next start.
set -uo pipefail

# shellcheck source=tests/cluster/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"  # state, conf, program_of, pid_of
[ -d "$state/pids" ] || exit 0

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
