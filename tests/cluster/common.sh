# Shared by start_slurm.sh and stop_slurm.sh (sourced, not run): state, conf,
# program_of, pid_of.

# Where the cluster's generated files, pids and logs live.
state="${SPARSEBENCH_SLURM_DIR:-${TMPDIR:-/tmp}/sparsebench-slurm}"
conf="$state/slurm.conf"

# The program a pid runs: argv[0]'s basename, looking through `nohup`, which
# the process still is between fork and exec.
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
