"""slurm.conf: this node's NodeName and SlurmdSpoolDir, and how they become the daemon's defaults."""

from __future__ import annotations

import socket
import subprocess

import pytest

from conftest import NODESTEPCTL
from nodestepd.config.settings import load_config
from nodestepd.config.slurmconf import SlurmConfError, expand_hostlist, parse_slurm_conf

HOST = socket.gethostname()
SHORT = HOST.split(".", 1)[0]


@pytest.mark.parametrize("text,names", [
    ("node1", ["node1"]),
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[01-02,07],login1", ["node01", "node02", "node07", "login1"]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
    ("a[1],b[3-3]", ["a1", "b3"]),
])
def test_hostlists(text, names):
    assert expand_hostlist(text) == names


@pytest.mark.parametrize("text", ["node[3-1]", "node[x]", "node[1-2", "rack[1-2]node[1-2]"])
def test_bad_hostlists(text):
    with pytest.raises(SlurmConfError):
        expand_hostlist(text)


SLURM_CONF = """\
# a cluster
ClusterName=test
SlurmdSpoolDir=/var/spool/slurmd-%n   # per node
NodeName=DEFAULT CPUs=4
NodeName=login1 CPUs=2
NODENAME=cn[01-04] NodeHostname=h1,h2,{host},h4 \\
    RealMemory=1000
PartitionName=debug Nodes=cn[01-04] Default=YES
"""


def test_node_name_by_node_hostname():
    conf = parse_slurm_conf(SLURM_CONF.format(host=HOST))
    assert conf.node_name_for(HOST) == "cn03"
    assert conf.spool_dir_for("cn03", HOST) == "/var/spool/slurmd-cn03"
    assert conf.node_name_for("elsewhere") is None


def test_node_name_by_node_name():
    conf = parse_slurm_conf(f"NodeName=x[1-2],{SHORT} CPUs=1\n")
    assert conf.node_name_for(HOST) == SHORT
    assert conf.spool_dir is None and conf.spool_dir_for(SHORT, HOST) is None


def test_daemon_defaults_come_from_slurm_conf(tmp_path):
    slurm = tmp_path / "slurm.conf"
    slurm.write_text(SLURM_CONF.format(host=HOST))
    config = load_config(None, {"slurm_conf": str(slurm)})
    assert (config.node_name, config.spool_dir) == ("cn03", "/var/spool/slurmd-cn03")


def test_the_toml_file_and_the_command_line_win(tmp_path):
    slurm = tmp_path / "slurm.conf"
    slurm.write_text(SLURM_CONF.format(host=HOST))
    toml = tmp_path / "nodestepd.toml"
    toml.write_text(f'slurm_conf = "{slurm}"\nnode_name = "mine"\n')
    config = load_config(str(toml), {})
    # %n in SlurmdSpoolDir is the node name in force.
    assert (config.node_name, config.spool_dir) == ("mine", "/var/spool/slurmd-mine")
    config = load_config(str(toml), {"spool_dir": "/srv/spool"})
    assert (config.node_name, config.spool_dir) == ("mine", "/srv/spool")


def test_without_slurm_conf_the_built_in_defaults_hold(tmp_path):
    config = load_config(None, {"slurm_conf": str(tmp_path / "absent.conf")})
    assert (config.node_name, config.spool_dir) == (SHORT, "/var/spool/nodestepd")


def test_an_unreadable_hostlist_is_a_config_error(tmp_path):
    slurm = tmp_path / "slurm.conf"
    slurm.write_text("NodeName=cn[01-\n")
    from nodestepd.config.settings import ConfigError

    with pytest.raises(ConfigError, match=f"{slurm}: hostlist 'cn\\[01-'"):
        load_config(None, {"slurm_conf": str(slurm)})


def test_doctor_shows_the_node_name_from_slurm_conf(tmp_path, user):
    tmp_path.chmod(0o755)
    slurm = tmp_path / "slurm.conf"
    slurm.write_text(SLURM_CONF.format(host=HOST).replace("/var/spool/slurmd-%n", f"{tmp_path}/slurmd-%n"))
    toml = tmp_path / "nodestepd.toml"
    toml.write_text(f'slurm_conf = "{slurm}"\n')
    result = subprocess.run([str(NODESTEPCTL), "doctor", "--user", user.name, "--config", str(toml)],
                            capture_output=True, text=True, timeout=60)
    assert f"ok    daemon settings: {toml}; node name cn03" in result.stdout
    assert f"spool dir: {tmp_path}/slurmd-cn03 does not exist yet" in result.stdout
