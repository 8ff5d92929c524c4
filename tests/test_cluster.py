"""The workflow through a real SLURM: the single-node cluster of tests/cluster/start_slurm.sh.

`.ci/run` starts that cluster before pytest; elsewhere these tests are skipped
unless `sbatch` is on PATH and a cluster answers with the test profile's
partition. They run snakemake with tests/cluster/profile (executor slurm,
squeue status checks) and check, from snakemake's log and from SLURM itself
(`scontrol show job`, which keeps finished jobs for MinJobAge=600 s), that
every non-local job was a SLURM job that completed; that the train jobs asked
SLURM for a GPU (the node declares fake ones); that a job failing once is
retried per the profile; and that after a kill, the rerun does only what is
missing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from pipeline import REPO, SNAKEMAKE, run_snakemake, snakemake_command, tiny_overlay

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROFILE = REPO / "tests" / "cluster" / "profile"
TOY = REPO / "tests" / "cluster" / "toy" / "Snakefile"
PROFILE_CONFIG = yaml.safe_load((PROFILE / "config.yaml").read_text())
PARTITION = PROFILE_CONFIG["default-resources"]["slurm_partition"]

SUBMITTED = re.compile(
    r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", re.M
)
FINISHED = re.compile(r"Finished jobid: (\d+) \(Rule: (\w+)\)")
RUN_ID = re.compile(r"SLURM run ID: (\S+)")
JOB_STATS = re.compile(r"^job\s+count\n-+\s+-+\n(.*?)\n(?:total|-)", re.M | re.S)


def slurm_state_dir() -> Path:
    """Where tests/cluster/start_slurm.sh keeps the cluster (same rule as the script)."""
    env = os.environ.get("SPARSEBENCH_SLURM_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("TMPDIR") or "/tmp") / "sparsebench-slurm"


@pytest.fixture(scope="module")
def slurm():
    """The environment to reach the cluster in; skips with the reason when there is none."""
    if shutil.which("sbatch") is None:
        pytest.skip(
            "sbatch is not on PATH: no SLURM here. tests/cluster/start_slurm.sh installs and "
            "starts a single-node one on localhost (.ci/run does that)"
        )
    conf = slurm_state_dir() / "slurm.conf"
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("SLURM_CONF") and conf.is_file():
            mp.setenv("SLURM_CONF", str(conf))
        # CUDA_VISIBLE_DEVICES comes from SLURM inside the jobs, not from here.
        mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        # `scontrol ping` answers at once; sinfo retries for half a minute when down.
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        if ping.returncode != 0 or "UP" not in ping.stdout:
            reason = (ping.stdout.strip().splitlines() or [ping.stderr.strip()])[0]
            pytest.skip(
                f"SLURM is not up ({reason[:200]}); start it with tests/cluster/start_slurm.sh"
            )
        try:
            info = subprocess.run(
                ["sinfo", "-h", "-o", "%R %a %T"], capture_output=True, text=True, timeout=30
            )
        except subprocess.TimeoutExpired:
            pytest.skip(
                "SLURM is not answering (sinfo timed out); start tests/cluster/start_slurm.sh"
            )
        if info.returncode != 0:
            pytest.skip(
                f"SLURM is not up (sinfo: {info.stderr.strip()[:200]}); "
                "start it with tests/cluster/start_slurm.sh"
            )
        usable = [
            line
            for line in info.stdout.splitlines()
            if line.split()[:2] == [PARTITION, "up"]
            and re.match(r"(idle|mixed|allocated|completing)", line.split()[2])
        ]
        if not usable:
            pytest.skip(
                f"no usable partition {PARTITION!r} in this SLURM (sinfo: {info.stdout.strip()}); "
                "tests/cluster/start_slurm.sh makes one"
            )
        yield


def scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    return dict(
        field.split("=", 1) for field in out.stdout.split() if "=" in field and field[0].isupper()
    )


def submissions(log: str) -> list[dict[str, str]]:
    """Every SLURM submission in a snakemake log: snakemake job id, SLURM job id, rule, key
    (the job's wildcards), job (rule and key)."""
    found = []
    for jobid, slurm_id, path in SUBMITTED.findall(log):
        parts = Path(path).parts
        rule_dir = next(i for i, part in enumerate(parts) if part.startswith("rule_"))
        rule = parts[rule_dir][len("rule_") :]
        key = "/".join(parts[rule_dir + 1 : -1])  # the job's wildcards
        job = f"{rule} {key}"
        found.append(
            {"jobid": jobid, "slurm": slurm_id, "rule": rule, "key": key, "job": job, "log": path}
        )
    return found


def job_stats(log: str) -> Counter:
    match = JOB_STATS.search(log)
    assert match, f"no job stats in the log:\n{log[:3000]}"
    stats = Counter()
    for line in match.group(1).splitlines():
        name, count = line.split()
        stats[name] = int(count)
    return stats


def local_rules(log: str) -> Counter:
    return Counter(re.findall(r"^localrule (\w+):", log, re.M))


def test_pipeline_through_slurm_and_resume_after_kill(slurm, synthetic_mnist, tmp_path):
    """The tiny experiment through SLURM, killed as its prune jobs start, then resumed.

    2 arms x 1 seed: 2 train and 2 prune SLURM jobs (few, to keep the test short:
    each SLURM job costs some 30 s of Snakemake and torch start-up on 2 cores).
    The first run is killed (snakemake with SIGKILL, its SLURM jobs with
    scancel) as soon as both train jobs are done, while the prune jobs are
    being submitted or started. After `--unlock`, the rerun must submit only
    the jobs whose outputs are missing, through SLURM, and complete the workflow.
    """
    started = time.monotonic()
    workdir = tmp_path / "run"
    workdir.mkdir()
    overlay = tiny_overlay(
        synthetic_mnist.dir,
        synthetic_mnist.checksums,
        experiments={"tiny": {"seeds": 1, "seeds_per_job": 1}},
    )
    profile = ("--profile", str(PROFILE))

    # --- first run, killed -------------------------------------------------------------
    first_log = workdir / "first.log"
    with first_log.open("w") as sink:
        proc = subprocess.Popen(
            snakemake_command(workdir, overlay, *profile), stdout=sink, stderr=subprocess.STDOUT
        )
    trains = {"train tiny_none_seeds0-0", "train tiny_entropy_seeds0-0"}
    prunes = {"prune tiny_none_seeds0-0", "prune tiny_entropy_seeds0-0"}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            log = first_log.read_text()
            finished = {jobid for jobid, _ in FINISHED.findall(log)}
            if trains <= {s["job"] for s in submissions(log) if s["jobid"] in finished}:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    first = first_log.read_text()
    assert proc.returncode == -signal.SIGKILL, f"the first run ended by itself:\n{first[-4000:]}"
    run_id = RUN_ID.search(first).group(1)
    subprocess.run(["scancel", f"--name={run_id}"], check=True, timeout=30)
    total = job_stats(first)
    assert total["train"] == 2 and total["prune"] == 2, total
    finished = {jobid for jobid, _ in FINISHED.findall(first)}
    done_first = {s["job"] for s in submissions(first) if s["jobid"] in finished}
    assert trains <= done_first, first[-4000:]
    done_outputs = [
        workdir / "results" / "tiny" / job.split("_")[1] / "train" / job.split("_")[2]
        for job in done_first & trains
    ]
    mtimes = {p: p.stat().st_mtime_ns for p in done_outputs}

    # --- the rerun: only what is missing ----------------------------------------------------
    run_snakemake(workdir, overlay, *profile, "--unlock")
    result = run_snakemake(workdir, overlay, *profile)
    second = result.stdout + result.stderr
    planned = job_stats(second)
    resubmitted = submissions(second)
    rerun = {s["job"] for s in resubmitted}
    assert not rerun & done_first, f"finished jobs ran again: {rerun & done_first}"
    # What was not finished ran, exactly once, and nothing else.
    assert rerun | done_first == trains | prunes
    assert len(rerun) == len(resubmitted) == planned["train"] + planned["prune"]
    assert planned["train"] == len(trains - done_first), (planned, done_first)
    assert planned["prune"] == 2 - len(done_first - trains), planned
    for path, mtime in mtimes.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"

    # --- every non-local job went through SLURM and completed there ------------------------
    remote = Counter(re.findall(r"^rule (\w+):", second, re.M))
    assert remote == Counter(s["rule"] for s in resubmitted), "a job bypassed SLURM"
    for log in (first, second):
        assert set(local_rules(log)) <= {"download", "aggregate", "figures", "all"}
    assert local_rules(second) == Counter(aggregate=1, figures=1, all=1)
    seen = {}
    for log in (first, second):
        run = RUN_ID.search(log).group(1)
        for s in submissions(log):
            job = scontrol_job(s["slurm"])
            seen[s["slurm"]] = f"{s['rule']} {s['key']}: {job['JobState']}"
            assert job["JobName"] == run and job["Partition"] == PARTITION, job
            if log is second or s["jobid"] in finished:
                assert job["JobState"] == "COMPLETED", (s, job)
            if job["JobState"] != "CANCELLED":  # cancelled before it started: no log
                assert Path(s["log"]).is_file() and workdir in Path(s["log"]).parents, s
            if s["rule"] == "train":
                # The profile's `gpu: 1` reached SLURM as a GPU request (a fake GPU here).
                assert "gpu:1" in job.get("TresPerJob", ""), job
    all_ids = [s["slurm"] for log in (first, second) for s in submissions(log)]
    assert len(set(all_ids)) == len(all_ids), "SLURM job ids repeat"

    # --- outputs complete ---------------------------------------------------------------------
    reports = workdir / "reports" / "tiny"
    for name in ("accuracy_vs_kept", "kept_at_accuracy"):
        for ext in ("csv", "md"):
            assert (reports / "tables" / f"{name}.{ext}").stat().st_size > 0
    for name in ("entropy_matrices", "weight_matrices", "accuracy_vs_kept"):
        for ext in ("png", "svg"):
            assert (reports / "figures" / f"{name}.{ext}").stat().st_size > 0
    sweeps = sorted((workdir / "results" / "tiny").glob("*/prune/*/seed*.csv"))
    assert len(sweeps) == 2

    # --- a lost prune folder and tables: the plan redoes that prune job and the summaries
    # only (Snakemake rebuilds a missing intermediate only where something downstream is
    # missing too, hence the tables.)
    shutil.rmtree(sweeps[0].parent)
    shutil.rmtree(reports / "tables")
    plan = run_snakemake(workdir, overlay, *profile, "-n")
    replanned = job_stats(plan.stdout + plan.stderr)
    assert replanned == Counter(prune=1, aggregate=1, figures=1, all=1), replanned

    elapsed = time.monotonic() - started
    print(f"\ncluster pipeline test: {elapsed:.0f} s; SLURM jobs: {seen}")


def test_failing_job_is_retried_per_profile(slurm, tmp_path):
    """A job failing on its first attempt is resubmitted (retries: 1) and succeeds."""
    assert PROFILE_CONFIG["retries"] >= 1
    result = subprocess.run(
        [str(SNAKEMAKE), "-s", str(TOY), "--directory", str(tmp_path), "--profile", str(PROFILE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    flaky = [s for s in submissions(log) if s["rule"] == "flaky"]
    assert len(flaky) == 2, flaky
    states = [scontrol_job(s["slurm"])["JobState"] for s in flaky]
    assert states == ["FAILED", "COMPLETED"], states
    assert "Trying to restart job" in log
    attempts = (tmp_path / "jobs.log").read_text()
    assert f"rule=flaky attempt=1 job={flaky[0]['slurm']}" in attempts
    assert f"rule=flaky attempt=2 job={flaky[1]['slurm']}" in attempts
    # The toy's `train` jobs got the profile's GPU request; SLURM handed each a device index.
    trains = [s for s in submissions(log) if s["rule"] == "train"]
    assert len(trains) == 2
    for s in trains:
        assert "gpu:1" in scontrol_job(s["slurm"]).get("TresPerJob", "")
        assert re.search(rf"rule=train i=\d job={s['slurm']} gpus=\d", attempts), attempts
    print(f"\nretry test: SLURM jobs {[(s['rule'], s['slurm']) for s in submissions(log)]}")
