"""The generated one-node SLURM configuration (no daemons started here; test_real_slurm.py starts them)."""

from __future__ import annotations

import stat

from slurm.local_cluster import LocalSlurm, LocalSlurmConfig


def _conf(path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def test_config_is_self_contained_under_its_root(tmp_path):
    cluster = LocalSlurm(tmp_path, LocalSlurmConfig(cpus=2, cred_expire_s=7))
    cluster.write_config()
    conf = _conf(cluster.conf_path)
    # No cgroups (containers), requeue allowed, everything the daemons write under the root.
    assert conf["ProctrackType"] == "proctrack/linuxproc" and conf["TaskPlugin"] == "task/none"
    assert conf["JobRequeue"] == "1"
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldLogFile", "SlurmdLogFile", "SlurmctldPidFile"):
        assert conf[key].startswith(str(tmp_path)), key
    assert f"socket={tmp_path}/munge/munge.socket" in conf["AuthInfo"] and "cred_expire=7" in conf["AuthInfo"]
    assert conf["SlurmctldPort"] != conf["SlurmdPort"]
    node = [line for line in cluster.conf_path.read_text().splitlines() if line.startswith("NodeName=")]
    assert node == [f"NodeName={cluster.node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN"]
    assert (tmp_path / "etc" / "cgroup.conf").is_file()
    key = tmp_path / "munge" / "munge.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_size == 1024
    assert stat.S_IMODE((tmp_path / "munge").stat().st_mode) == 0o700


def test_client_environment_points_at_the_cluster_and_drops_job_variables(tmp_path):
    cluster = LocalSlurm(tmp_path)
    env = cluster.env({"PATH": "/usr/bin", "HOME": "/root", "SLURM_JOB_ID": "9", "SLURM_PROCID": "3",
                       "RANK": "1", "MASTER_PORT": "5", "SBATCH_ACCOUNT": "x"})
    assert env["SLURM_CONF"] == str(cluster.conf_path)
    assert env["HOME"] == "/root" and "/usr/sbin" in env["PATH"]
    assert not {"SLURM_JOB_ID", "SLURM_PROCID", "RANK", "MASTER_PORT", "SBATCH_ACCOUNT"} & set(env)
