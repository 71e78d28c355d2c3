#!/bin/sh
# make-bundle.sh USER DIR: a tiny rootless OCI bundle in DIR owned by USER:
# busybox-static with its applet links in rootfs/bin, config.json from `runc spec --rootless`
# (run as USER, so the uid/gid mappings are USER's), no terminal, writable rootfs.
set -eu
user=$1
dir=$2
mkdir -p "$dir/rootfs/bin" "$dir/rootfs/tmp" "$dir/rootfs/etc" "$dir/rootfs/proc" "$dir/rootfs/dev" "$dir/rootfs/sys"
cp /bin/busybox "$dir/rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$dir/rootfs/bin/$applet"
done
echo "root:x:0:0:root:/root:/bin/sh" > "$dir/rootfs/etc/passwd"
echo "root:x:0:" > "$dir/rootfs/etc/group"
rm -f "$dir/config.json"
chown -R "$user:" "$dir"
(cd "$dir" && setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups runc spec --rootless)
/usr/bin/python3 - "$dir/config.json" <<'PY'
import json, sys
path = sys.argv[1]
with open(path) as f:
    config = json.load(f)
config["process"]["terminal"] = False
config["process"]["args"] = ["sh"]
config["root"]["readonly"] = False
with open(path, "w") as f:
    json.dump(config, f, indent=2)
PY
chown "$user:" "$dir/config.json"
