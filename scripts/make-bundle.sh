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
chown -R "$user:" "$dir"
sh "$(dirname "$0")/rootless-spec.sh" "$user" "$dir" sh
