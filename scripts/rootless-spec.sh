#!/bin/sh
# rootless-spec.sh USER DIR PROGRAM: DIR/config.json from `runc spec --rootless`, run as USER
# (so the uid/gid mappings are USER's), then: no terminal, PROGRAM as the process, a
# writable rootfs; owned by USER. The bundle scripts (make-bundle.sh, make-mpi-bundle.sh)
# start from it.
set -eu
user=$1
dir=$2
program=$3
rm -f "$dir/config.json"
(cd "$dir" && setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups runc spec --rootless)
/usr/bin/python3 - "$dir/config.json" "$program" <<'PY'
import json, sys
path, program = sys.argv[1:]
with open(path) as f:
    config = json.load(f)
config["process"]["terminal"] = False
config["process"]["args"] = [program]
config["root"]["readonly"] = False
with open(path, "w") as f:
    json.dump(config, f, indent=2)
PY
chown "$user:" "$dir/config.json"
