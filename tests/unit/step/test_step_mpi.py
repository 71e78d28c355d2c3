"""MPI steps (step/mpi.py): what srun's environment makes of a step, and what its containers get."""

import pytest

from nodestepd.step import mpi
from nodestepd.step.mpi import MpiError, MpiSettings, MpiStep

PMIX_ENV = {
    "PMIX_NAMESPACE": "slurm.pmix.7.0", "PMIX_RANK": "0", "PMIX_SERVER_URI4": "pmix-server.1;tcp4://127.0.0.1:4",
    "PMIX_SERVER_TMPDIR": "/var/spool/slurmd/pmix.7.0/", "PMIX_SYSTEM_TMPDIR": "/tmp",
}
PMI2_ENV = {"PMI_FD": "3", "PMI_RANK": "1", "PMI_SIZE": "2", "PMI_JOBID": "7.0"}


def test_pmix_is_detected_with_the_steps_own_dirs():
    assert mpi.detect(PMIX_ENV, job_id=7, step_id=0, uid=1000) == MpiStep(
        "pmix", "/var/spool/slurmd/pmix.7.0", "/tmp/spmix_appdir_1000_7.0")


@pytest.mark.parametrize("server", ["/etc", "/var/spool/slurmd/pmix.8.0", "relative/pmix.7.0",
                                    "/var/spool/../etc/pmix.7.0", ""])
def test_a_server_dir_not_shaped_as_this_steps_is_not_bound(server):
    found = mpi.detect({**PMIX_ENV, "PMIX_SERVER_TMPDIR": server}, job_id=7, step_id=0, uid=1000)
    assert found is not None and found.pmix_server_dir is None


def test_pmi2_and_plain_steps():
    assert mpi.detect(PMI2_ENV, job_id=7, step_id=0, uid=1000) == MpiStep("pmi2")
    assert mpi.detect({"PMIX_NAMESPACE": "x"}, job_id=7, step_id=0, uid=1000) is None  # no server to reach
    assert mpi.detect({"PATH": "/bin", "PMI_FD": "x", "PMI_RANK": "0"}, job_id=7, step_id=0, uid=1000) is None


def test_own_uid_is_for_pmix_unless_the_site_says_never():
    pmix, pmi2 = MpiStep("pmix", None, None), MpiStep("pmi2")
    assert mpi.needs_own_uid(pmix, MpiSettings(), 1000)
    assert not mpi.needs_own_uid(pmix, MpiSettings(user_namespace="never"), 1000)
    assert not mpi.needs_own_uid(pmi2, MpiSettings(), 1000)
    assert not mpi.needs_own_uid(None, MpiSettings(), 1000)


def test_subordinate_ranges_by_name_or_uid_capped():
    subuid = "# c\nbob:100000:65536\nalice:200000:100000\n"
    subgid = "1000:300000:10\n"
    assert mpi.subid_ranges("alice", 1000, subuid, subgid) == mpi.SubidRanges(200000, 65536, 300000, 10)
    assert mpi.subid_ranges("carol", 1001, subuid, subgid) is None
    assert mpi.subid_ranges("alice", 1000, subuid, "") is None


def config(**linux):
    return {"process": {"args": ["x"], "user": {"uid": 0, "gid": 0}},
            "mounts": [{"destination": "/dev/shm", "type": "tmpfs", "source": "shm"}],
            "linux": {"namespaces": [{"type": "mount"}, {"type": "user"}], **linux}}


def test_pmix_containers_get_the_mounts_and_the_users_own_uid():
    step = MpiStep("pmix", "/spool/pmix.7.0", "/tmp/spmix_appdir_1000_7.0")
    original = config(uidMappings=[{"containerID": 0, "hostID": 1000, "size": 1}])
    new, warnings = mpi.rewrite_config(original, step, MpiSettings(), uid=1000, gid=1001, own_uid=True)
    assert warnings == []
    assert new["mounts"] == [
        {"destination": d, "type": "bind", "source": d, "options": ["rbind", "rw"]}
        for d in ("/dev/shm", "/spool/pmix.7.0", "/tmp/spmix_appdir_1000_7.0")
    ]  # the bundle's private /dev/shm replaced by the host's
    assert new["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 1, "size": 1},
                                           {"containerID": 1000, "hostID": 0, "size": 1}]
    assert new["linux"]["gidMappings"] == [{"containerID": 0, "hostID": 1, "size": 1},
                                           {"containerID": 1001, "hostID": 0, "size": 1}]
    assert new["process"]["user"] == {"uid": 1000, "gid": 1001}
    assert original["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 1000, "size": 1}]  # untouched


def test_pmi2_containers_keep_their_mapping_and_skip_the_pmix_dirs():
    new, _ = mpi.rewrite_config(config(), MpiStep("pmi2"), MpiSettings(mounts=("/dev/shm", "pmix-server-dir", "/scratch")),
                                uid=1000, gid=1000, own_uid=False)
    assert [m["destination"] for m in new["mounts"]] == ["/dev/shm", "/scratch"]
    assert "uidMappings" not in new["linux"] and new["process"]["user"] == {"uid": 0, "gid": 0}


def test_a_network_namespace_is_refused_or_warned_of():
    netns = config(namespaces=[{"type": "network"}, {"type": "user"}])
    with pytest.raises(MpiError, match="own network namespace.*remove the \"network\" namespace"):
        mpi.rewrite_config(netns, MpiStep("pmi2"), MpiSettings(), uid=1000, gid=1000, own_uid=False)
    _, warnings = mpi.rewrite_config(netns, MpiStep("pmi2"), MpiSettings(network_namespace="warn"), uid=1000,
                                     gid=1000, own_uid=False)
    assert len(warnings) == 1 and "own network namespace" in warnings[0]


def test_a_pmix_step_of_a_user_without_subordinate_ids_is_refused_before_anything_is_made():
    from types import SimpleNamespace

    from nodestepd.process.identity import Identity
    from nodestepd.step.prepare import _mpi_plan
    from nodestepd.step.spec import LaunchFailed

    nobody = Identity("no-such-user-of-subids", 3999999, 3999999, (), "/")
    spec = SimpleNamespace(identity=nobody, job_id=7, step_id=0)
    def settings(create_start=False, **mpi_settings):
        return SimpleNamespace(mpi=MpiSettings(**mpi_settings),
                               step=SimpleNamespace(commands=SimpleNamespace(create_start=create_start)))

    with pytest.raises(LaunchFailed, match="a PMIx step must run as no-such-user-of-subids's own uid .* there are "
                                           "none"):
        _mpi_plan(spec, PMIX_ENV, settings(), config())
    with pytest.raises(LaunchFailed, match="which takes RunTimeRun"):
        _mpi_plan(spec, PMIX_ENV, settings(create_start=True), config())
    plan, warnings = _mpi_plan(spec, PMIX_ENV, settings(user_namespace="never"), config())
    assert (plan.step.kind, plan.own_uid, warnings) == ("pmix", None, [])
    assert _mpi_plan(spec, {"PATH": "/bin"}, settings(), config()) == (None, [])
