#!/bin/sh
# make-mpi-bundle.sh USER DIR: an OCI bundle in DIR, owned by USER, for the MPI tests,
# built offline from this host: tests/mpi/mpi_hello.c compiled against the host's Open MPI
# (DIR/rootfs/mpi/openmpi/mpi_hello) and MPICH (DIR/rootfs/mpi/mpich/mpi_hello), and a
# rootfs whose /usr and /etc are the host's, bound read-only (so the MPI libraries, their
# plugins and configuration are the ones srun's PMIx/PMI2 side runs with). /bin, /lib,
# /lib64 and /sbin are merged-/usr links, as on Debian 12.
#
# config.json: rootless-spec.sh's, then what MPI in a per-task container
# needs from the bundle itself (docs/admin-guide.md#mpi): no network namespace (the PMIx
# server is reached on the host's loopback), the host's pid namespace (Open MPI's
# shared-memory transport tells ranks apart by pid; two ranks that are both pid 1 crash in
# it), and so /proc bound from the host rather than mounted; the node's hostname (no UTS
# namespace). nodestepd adds the rest per
# step (/dev/shm, the step's PMIx dirs, the user's own uid for PMIx).
set -eu
user=$1
dir=$2
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dir/rootfs/mpi/openmpi" "$dir/rootfs/mpi/mpich"
for d in usr etc tmp proc dev sys run home; do mkdir -p "$dir/rootfs/$d"; done
for l in bin lib lib64 sbin; do ln -sfn "usr/$l" "$dir/rootfs/$l"; done
mpicc.openmpi -O2 -Wall -o "$dir/rootfs/mpi/openmpi/mpi_hello" "$here/tests/mpi/mpi_hello.c"
mpicc.mpich -O2 -Wall -o "$dir/rootfs/mpi/mpich/mpi_hello" "$here/tests/mpi/mpi_hello.c"
chown -R "$user:" "$dir"
sh "$here/scripts/rootless-spec.sh" "$user" "$dir" /mpi/openmpi/mpi_hello
/usr/bin/python3 - "$dir/config.json" <<'PY'
import json, sys
path = sys.argv[1]
with open(path) as f:
    config = json.load(f)
linux = config["linux"]
linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] not in ("network", "pid", "uts")]
config.pop("hostname", None)  # the node's: ranks report where they run
mounts = [m for m in config["mounts"] if m["destination"] not in ("/proc", "/sys", "/sys/fs/cgroup")]
mounts.insert(0, {"destination": "/proc", "type": "bind", "source": "/proc", "options": ["rbind", "nosuid", "nodev", "noexec"]})
mounts += [
    {"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "nosuid", "nodev", "noexec", "ro"]},
    {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
    {"destination": "/etc", "type": "bind", "source": "/etc", "options": ["rbind", "ro"]},
]
config["mounts"] = mounts
linux.pop("maskedPaths", None)  # /proc is the host's, bound: runc cannot mask paths of it
linux.pop("readonlyPaths", None)
with open(path, "w") as f:
    json.dump(config, f, indent=2)
PY
chown "$user:" "$dir/config.json"
