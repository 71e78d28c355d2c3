#!/bin/sh
# Install what nodestepd and its tests need on a Debian 12 machine (as root). Idempotent.
#   Debian: runc, busybox-static (test bundles), charliecloud-runtime (ch-run), python3-venv,
#           gcc libc6-dev (pip compiles nodestepd-monitor, the per-task parent, from C),
#           systemd (systemd-analyze verifies the units; systemd-socket-activate tests activation),
#           man-db (the man page test renders with man -l),
#           skopeo umoci (`run --image`: the import, run as the user; the tests build their images with them),
#           munge slurmctld slurmd slurm-client (a private single-node Slurm for the srun test;
#           no service is enabled or configured, the test starts its own daemons),
#           uidmap (newuidmap: a test user's subordinate uids in `unshare --map-auto`)
#           openmpi-bin libopenmpi-dev mpich libmpich-dev (the MPI tests' program, built against
#           Open MPI for srun --mpi=pmix and MPICH for --mpi=pmi2: scripts/make-mpi-bundle.sh)
#           iproute2 (ip: the veth pair between the two simulated Slurm nodes of the two-node tests)
#           strace (holds the daemon at one syscall, for a restart test's exact moment)
#           skopeo umoci (the image tools doctor checks)
#           podman conmon slirp4netns fuse-overlayfs uidmap docker.io rootlesskit (rootless podman
#           and docker, run by the tests through nodestep-oci and runc; docker.io's services are
#           kept from starting: the tests start their own rootless dockerd)
#   PyPI:   nodestepd with its test extras (matplotlib among them, for the bench smoke test's
#           chart), in a venv every user can read (/opt/nodestepd/venv), because the tests run
#           nodestepctl as unprivileged users.
#   Users:  nsdtest1, nsdtest2, or those NODESTEPD_TEST_USERS names (unprivileged test users),
#           with /run/user/UID and /etc/subuid, /etc/subgid ranges.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${NODESTEPD_VENV:-/opt/nodestepd/venv}

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (the daemon runs as root; it creates test users)" >&2
    exit 1
fi

missing=""
for pkg in runc busybox-static charliecloud-runtime python3 python3-venv python3-pip gcc libc6-dev systemd \
           man-db munge slurmctld slurmd slurm-client uidmap skopeo umoci strace iproute2 \
           podman conmon slirp4netns fuse-overlayfs docker.io rootlesskit \
           openmpi-bin libopenmpi-dev mpich libmpich-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "setup.sh: installing Debian packages:$missing"
    # Installing must not start services (munged, slurmd): the tests start their own, privately.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

umask 022
if [ ! -x "$venv/bin/python" ]; then
    echo "setup.sh: creating $venv"
    mkdir -p "$(dirname "$venv")"
    /usr/bin/python3 -m venv "$venv"
fi
echo "setup.sh: installing nodestepd into $venv"
"$venv/bin/pip" install -q --disable-pip-version-check "$repo[test]"
ln -sf "$venv/bin/nodestepd" /usr/local/bin/nodestepd
ln -sf "$venv/bin/nodestepctl" /usr/local/bin/nodestepctl
# The OCI runtime proxy podman and docker are configured with (docs/user-guide.md), when
# this version of nodestepd has it.
if [ -e "$venv/bin/nodestep-oci" ]; then
    ln -sf "$venv/bin/nodestep-oci" /usr/local/bin/nodestep-oci
fi

users=$(echo "${NODESTEPD_TEST_USERS:-nsdtest1,nsdtest2}" | tr , ' ')
for user in $users; do
    id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$user"
    uid=$(id -u "$user")
    # Rootless podman and docker need subordinate ids. useradd gives a new user ranges; a
    # user made before (or by another tool) gets the next free 65536 past every range.
    for file in /etc/subuid /etc/subgid; do
        touch "$file"
        if ! grep -q "^$user:" "$file"; then
            start=$(awk -F: 'BEGIN { end = 100000 } $2 + $3 > end { end = $2 + $3 } END { print end }' "$file")
            echo "$user:$start:65536" >> "$file"
        fi
    done
    # runc's --root=/run/user/UID needs the user's runtime dir (systemd-logind makes it on login).
    install -d -m 0700 -o "$user" -g "$user" "/run/user/$uid"
done
echo "setup.sh: ready"
