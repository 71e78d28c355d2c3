#!/bin/sh
# One command on a fresh Debian 12 machine (as root): install, ask `nodestepctl doctor`
# about the node, start nodestepd with the Slurm guide's runc run-mode oci.conf, and run a
# real container step through it as an unprivileged user. Leaves nothing running.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup.sh"

demo=/var/tmp/nodestepd-demo
user=nsdtest1
mkdir -p "$demo"
chmod 755 "$demo"
[ -f "$demo/bundle/config.json" ] || sh "$repo/scripts/make-bundle.sh" "$user" "$demo/bundle"
cp "$repo/tests/oci-conf-examples/runc-run.conf" "$demo/oci.conf"
cat > "$demo/nodestepd.toml" <<EOF
socket = "$demo/nodestepd.sock"
oci_conf = "$demo/oci.conf"
spool_dir = "$demo/spool"
state_dir = "$demo/state"
EOF

echo "demo: first, what could keep $user's containers from running here:"
echo "  nodestepctl doctor --config $demo/nodestepd.toml --user $user --bundle $demo/bundle"
nodestepctl doctor --config "$demo/nodestepd.toml" --user "$user" --bundle "$demo/bundle"
echo

nodestepd --config "$demo/nodestepd.toml" 2>"$demo/nodestepd.log" &
daemon=$!
trap 'kill "$daemon" 2>/dev/null; wait "$daemon" 2>/dev/null || true' EXIT
# Wait (bounded) for the daemon to answer.
tries=0
until nodestepctl --socket "$demo/nodestepd.sock" status >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ] || ! kill -0 "$daemon" 2>/dev/null; then
        echo "demo: nodestepd did not start:" >&2
        cat "$demo/nodestepd.log" >&2
        exit 1
    fi
    sleep 0.1
done
nodestepctl --socket "$demo/nodestepd.sock" status

echo
echo "demo: running a container step as $user:"
echo "  nodestepctl run --bundle $demo/bundle -- sh -c 'echo hello from a container; uname -sr; id; exit 3'"
cd "$demo"
status=0
setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups -- \
    nodestepctl --socket "$demo/nodestepd.sock" run --bundle "$demo/bundle" -- \
    sh -c 'echo hello from a container; uname -sr; id; exit 3' || status=$?
echo "demo: the step exited with status $status (the container's own exit code)"
echo "demo: daemon log:"
sed 's/^/  /' "$demo/nodestepd.log"
[ "$status" = 3 ]
