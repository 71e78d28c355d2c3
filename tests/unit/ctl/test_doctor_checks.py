"""The doctor's new checks that need no root: image tool versions, the image cache's free
space, and stage hooks that cannot be used whoever owns them (tests/e2e/test_doctor.py
runs them all for real)."""

from __future__ import annotations

import os

import pytest

from nodestepd.config.settings import DaemonConfig
from nodestepd.ctl.checks import IMAGE_CACHE_MIN_FREE, Level, check_stage_hooks, image_cache_space
from nodestepd.ctl.probes import UMOCI_ZSTD, tool_version
from nodestepd.process.identity import Identity


@pytest.mark.parametrize("line, version", [
    ("umoci version 0.4.7+ds-3+b7", (0, 4)),
    ("umoci version v0.5.0", (0, 5)),
    ("skopeo version 1.9.3", (1, 9)),
    ("skopeo version 1.14.2 commit: abc", (1, 14)),
    ("umoci: unknown option", None),
    ("", None),
])
def test_tool_version(line, version):
    assert tool_version(line) == version


def test_umoci_gets_zstd_at_0_5():
    assert (0, 4) < UMOCI_ZSTD <= (0, 5) < (1, 0)


def test_image_cache_space():
    assert image_cache_space("/c", IMAGE_CACHE_MIN_FREE).level is Level.OK
    low = image_cache_space("/c", IMAGE_CACHE_MIN_FREE - 1)
    assert low.level is Level.WARN and low.fix == "free some space there, or set image_cache_dir to a larger file system."


def test_unset_stage_hooks_are_fine():
    me = Identity("someone", 4242, 4242, (), "/")
    checks = check_stage_hooks(DaemonConfig(), me)
    assert [(c.name, c.level, c.message) for c in checks] == [("stage_in", Level.OK, "not set"),
                                                             ("stage_out", Level.OK, "not set")]




# ---- MPI -----------------------------------------------------------------------------------


def _oci(tmp_path, text: str):
    from nodestepd.config.ociconf import load_oci_conf

    path = tmp_path / "oci.conf"
    path.write_text(text)
    return load_oci_conf(str(path))


RUNC_RUN = ('RunTimeRun="runc --rootless=true --root=/run/user/%U/ run %n.%u.%j.%s.%t -b %b"\n'
            'RunTimeKill="runc kill %n.%u.%j.%s.%t"\nRunTimeDelete="runc delete --force %n.%u.%j.%s.%t"\n')


def _mpi(tmp_path, oci_text=RUNC_RUN, bundle=None, subids="someone:100000:65536\n", **settings):
    from nodestepd.ctl.checks import check_mpi

    (tmp_path / "subuid").write_text(subids)
    (tmp_path / "subgid").write_text(subids)
    me = Identity("someone", 4242, 4242, (), "/")
    return check_mpi(DaemonConfig(**settings), _oci(tmp_path, oci_text), me, bundle,
                     str(tmp_path / "subuid"), str(tmp_path / "subgid"))


def test_mpi_fine(tmp_path):
    [check] = _mpi(tmp_path, bundle={"linux": {"namespaces": [{"type": "user"}]}})
    assert check.level is Level.OK


def test_mpi_warnings(tmp_path):
    checks = _mpi(tmp_path, 'EnvExclude="^(PMIX_|SLURM_CONF)"\n' + RUNC_RUN.replace("runc ", "crun "), subids="")
    assert [c.level for c in checks] == [Level.WARN, Level.WARN]
    assert "EnvExclude" in checks[0].message and "PMIX_NAMESPACE, PMIX_RANK" in checks[0].message
    assert "no subordinate uids" in checks[1].message
    [ch] = _mpi(tmp_path, RUNC_RUN.replace('"runc --rootless', '"ch-run --rootless'))
    assert ch.level is Level.WARN and "srun --mpi=pmi2 cannot work" in ch.message
    [never] = _mpi(tmp_path, mpi_user_namespace="never", bundle={"process": {"user": {"uid": 0}}})
    assert never.level is Level.WARN and "PMIx ranks run as uid 0" in never.message
    create_start = ('RunTimeCreate="runc create %n -b %b"\nRunTimeStart="runc start %n"\n'
                    'RunTimeQuery="runc state %n"\nRunTimeKill="runc kill %n"\nRunTimeDelete="runc delete %n"\n')
    [cs] = _mpi(tmp_path, create_start)
    assert cs.level is Level.WARN and "takes RunTimeRun" in cs.message
    netns = {"linux": {"namespaces": [{"type": "network"}]}}
    assert [c.level for c in _mpi(tmp_path, bundle=netns)] == [Level.FAIL]
    assert [c.level for c in _mpi(tmp_path, bundle=netns, mpi_network_namespace="warn")] == [Level.WARN]
