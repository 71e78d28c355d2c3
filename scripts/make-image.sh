#!/bin/sh
# make-image.sh DIR, run as the user who owns DIR (with HOME=DIR: umoci and skopeo keep
# state there): a small busybox image, built offline, in three forms:
#   DIR/layout (oci:DIR/layout:latest), DIR/img.tar (docker-archive), DIR/img-oci.tar (oci-archive).
# Its config: Entrypoint /bin/echo from-entrypoint, Cmd from-cmd, Env FOO=bar PATH=/bin,
# WorkingDir /work (tests/e2e/test_images.py checks them). The e2e tests and the bench
# (bench/images.py) both build their image with it.
set -eu
cd "$1"
umoci init --layout layout
umoci new --image layout:latest
umoci unpack --rootless --image layout:latest b
mkdir -p b/rootfs/bin b/rootfs/etc b/rootfs/work b/rootfs/tmp b/rootfs/data b/rootfs/dev b/rootfs/proc b/rootfs/sys
mkdir -p b/rootfs/etc/slurm b/rootfs/var/run/slurm b/rootfs/var/run/munge  # ch-run's binds (charliecloud.conf)
cp /bin/busybox b/rootfs/bin/busybox
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "b/rootfs/bin/$a"; done
echo "root:x:0:0:root:/root:/bin/sh" > b/rootfs/etc/passwd
umoci repack --image layout:latest b
rm -rf b
umoci config --image layout:latest --config.entrypoint /bin/echo --config.entrypoint from-entrypoint \
    --config.cmd from-cmd --config.env FOO=bar --config.env PATH=/bin --config.workingdir /work
skopeo copy --quiet oci:layout:latest docker-archive:img.tar
skopeo copy --quiet oci:layout:latest oci-archive:img-oci.tar
