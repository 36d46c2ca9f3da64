# The .deb on a node (x86_64-package, aarch64-package): install the
# package `cargo xtask package` built for this arch, configure it through
# its conffile, run the daemon exactly as the unit's ExecStart says, and
# forward HTTP; then upgrade to the next revision while a client loops
# requests, restarting the daemon as the package's postinst has systemd do
# (try-restart): 0 failed requests, the edited conffile kept, the pinned
# data plane adopted. Finally `meshlb cleanup` and purge.
#
#   client ns 10.200.0.2 -- lbc 10.200.0.1 [meshlb from the .deb, XDP] lbbN 10.201.N.1 -- bN ns 10.201.N.2 :8000
#
# The guest has no systemd: the unit is read, not run (systemd-analyze
# verify checks it on the host, `cargo xtask package --check`). ExecStart
# runs inside the part of the unit's sandbox that busybox can build (see
# /tmp/unit-sandbox below): a read-only file system but for the unit's
# ReadWritePaths and RuntimeDirectory, and its UMask.

BPFFS=/sys/fs/bpf/meshlb
UNIT=/lib/systemd/system/meshlb.service
CONF=/etc/meshlb/meshlb.toml
set -- /mnt/host/deb/1/meshlb_*.deb
DEB1=$1
set -- /mnt/host/deb/2/meshlb_*.deb
DEB2=$1
[ -f "$DEB1" ] && [ -f "$DEB2" ] || fail "no packages in /mnt/host/deb (cargo xtask vm test builds them)"
[ -x /bin/sh ] || fail "the guest tree has no /bin/sh for maintainer scripts"

# busybox sh would run its own `dpkg` applet: name the real tools.
dpkg() { /usr/bin/dpkg "$@"; }
dpkg_query() { /usr/bin/dpkg-query "$@"; }
version() { dpkg_query -W -f '${Status} ${Version}' meshlb 2>/dev/null; }

# -- install ---------------------------------------------------------------
must dpkg -i "$DEB1"
v1=$(version)
case $v1 in "install ok installed "*-1) ;; *) fail "after dpkg -i: meshlb is '$v1'" ;; esac
for f in /usr/bin/meshlb "$UNIT" "$CONF" /usr/share/man/man1/meshlb-run.1.gz \
    /usr/share/bash-completion/completions/meshlb; do
    [ -e "$f" ] || fail "dpkg -i installed no $f"
done
/usr/bin/meshlb --version | grep -q meshlb || fail "the installed meshlb does not run"
dpkg_query -W -f '${Conffiles}' meshlb | grep -q "$CONF" || fail "$CONF is not registered as a conffile"

# The daemon's command line, as the unit runs it.
EXEC=$(sed -n 's/^ExecStart=//p' "$UNIT")
case $EXEC in "/usr/bin/meshlb run --config $CONF"*) ;; *) fail "unexpected ExecStart: $EXEC" ;; esac

# -- topology and config ---------------------------------------------------
lb_topology
lb_peers_xdp_pass /usr/bin/meshlb

# What an operator does after installing: set interfaces and services in
# the conffile (its defaults are all comments).
cat >>"$CONF" <<'EOF'

# -- added by the package scenario --
node = "vm"
interfaces = ["lbc", "lbb1", "lbb2"]
xdp_mode = "native"
[metrics]
listen = "127.0.0.1:9742"
EOF
lb_service >>"$CONF"
get client http://10.96.0.10/ && fail "the VIP answered before meshlb ran"

# -- the unit's sandbox ----------------------------------------------------
# systemd-analyze is not in the guest tree: the score is printed where it is
# (the host: `systemd-analyze security --offline=true` on the unit).
if command -v systemd-analyze >/dev/null 2>&1; then
    log "exposure: $(systemd-analyze security --offline=true "$UNIT" 2>&1 | tail -n 1)"
else
    log "exposure: no systemd-analyze in the guest (the unit's header comment records the score)"
fi
grep -qx 'ProtectSystem=strict' "$UNIT" || fail "the unit has no ProtectSystem=strict"
SBX_UMASK=$(sed -n 's/^UMask=//p' "$UNIT")
[ -n "$SBX_UMASK" ] || fail "the unit sets no UMask="
# /tmp/unit-sandbox CMD...: CMD (same pid, exec all the way) in its own
# mount, UTS and IPC namespaces with every mount read-only
# (ProtectSystem=strict, ReadOnlyPaths=/sys) but /dev, /proc, a private
# /tmp (PrivateTmp), the ReadWritePaths and /run/<RuntimeDirectory>;
# no_new_privs; the unit's UMask. Not built here (no tools in the guest):
# the seccomp filter, the capability bounding set, PrivateDevices and the
# Protect*/Restrict* kernel settings.
SBX_RW="$(sed -n 's/^ReadWritePaths=//p' "$UNIT" | tr '\n' ' ')/run/$(sed -n 's/^RuntimeDirectory=//p' "$UNIT")"
cat >/tmp/unit-sandbox <<EOF
export SBX_RW="$SBX_RW" SBX_UMASK="$SBX_UMASK"
exec /bin/busybox unshare -m -u -i --propagation slave /bin/busybox sh -c '
    bb() { /bin/busybox "\$@"; }
    for d in \$SBX_RW; do
        bb mkdir -p "\$d" && bb mount --bind "\$d" "\$d" || { echo "sandbox: cannot bind \$d" >&2; exit 1; }
    done
    bb mount -t tmpfs -o mode=1777 tmpfs /tmp || exit 1
    for m in \$(bb cut -d" " -f2 /proc/mounts | bb sort -u); do
        case " \$SBX_RW /tmp " in *" \$m "*) continue ;; esac
        case \$m in /dev | /dev/* | /proc | /proc/*) continue ;; esac
        bb mount -o remount,bind,ro "\$m" || { echo "sandbox: cannot make \$m read-only" >&2; exit 1; }
    done
    umask "\$SBX_UMASK"
    exec /bin/busybox setpriv --nnp "\$@"' unit-sandbox "\$@"
EOF
sandboxed() { /bin/busybox sh /tmp/unit-sandbox "$@"; }
# The sandbox is real: /etc is read-only in it, the bpffs is not.
sandboxed /bin/busybox touch /etc/meshlb/sandbox-probe 2>/dev/null && fail "the sandbox let /etc/meshlb be written"
must sandboxed /bin/busybox sh -c 'mkdir /sys/fs/bpf/sandbox-probe && rmdir /sys/fs/bpf/sandbox-probe'
log "sandbox: read-only but $SBX_RW, umask $SBX_UMASK"

# unit_start LOGNAME: ExecStart in the sandbox, in the background
# (DAEMON_PID: the daemon itself, the sandbox execs it).
unit_start() {
    RUST_LOG=info /bin/busybox sh /tmp/unit-sandbox $EXEC >"$LOGDIR/meshlb-$1.log" 2>&1 &
    DAEMON_PID=$!
    bb tail -f "$LOGDIR/meshlb-$1.log" 2>/dev/null | while read -r l; do echo "[meshlb $1] $l"; done &
    end=$(($(cut -d. -f1 /proc/uptime) + 120))
    until /usr/bin/meshlb status --json --bpffs "$BPFFS" 2>/dev/null | grep -q '"name": *"web"'; do
        kill -0 "$DAEMON_PID" 2>/dev/null || fail "$1: meshlb exited: $(tail -n 5 "$LOGDIR/meshlb-$1.log" | tr '\n' ' ')"
        [ "$(cut -d. -f1 /proc/uptime)" -ge "$end" ] && fail "$1: meshlb not ready within 120s"
        bb usleep 250000
    done
}
# unit_stop: what systemd's stop does (KillMode=mixed: SIGTERM to the
# main process), bounded.
unit_stop() {
    stop_pid "$DAEMON_PID" || fail "meshlb did not stop on SIGTERM within 10s"
    wait "$DAEMON_PID" 2>/dev/null
}

# -- forward ---------------------------------------------------------------
unit_start v1
answers=
i=0
while [ $i -lt 20 ]; do
    url=http://10.96.0.10/
    [ $((i % 2)) = 1 ] && url=http://10.200.0.1/
    body=$(get client "$url") || fail "request $i to $url failed (after $i good ones)"
    answers="$answers $body"
    i=$((i + 1))
done
seen=$(tally $answers)
case $seen in *b1=*b2=*) ;; *) fail "only one backend answered: $seen" ;; esac
# UMask: what the daemon created is root's alone.
for f in /run/meshlb/pins/*.lock; do
    [ -e "$f" ] || fail "the daemon left no pin lock in /run/meshlb/pins"
    mode=$(bb stat -c %a "$f")
    [ "$mode" = 600 ] || fail "$f has mode $mode under UMask=$SBX_UMASK"
done

# -- upgrade under load ----------------------------------------------------
# A client loops requests (one line per request: ok or FAIL) until told to
# stop; the package is upgraded and the daemon restarted meanwhile.
rm -f /tmp/loop.stop /tmp/loop.out
(
    n=0
    while [ ! -e /tmp/loop.stop ] && [ $n -lt 2000 ]; do
        if b=$(get client http://10.96.0.10/); then echo "ok $b"; else echo "FAIL $n"; fi
        n=$((n + 1))
    done >/tmp/loop.out
) &
LOOP=$!
bb sleep 2
must dpkg -i "$DEB2"
v2=$(version)
case $v2 in "install ok installed "*-2) ;; *) fail "after the upgrade: meshlb is '$v2'" ;; esac
grep -q "added by the package scenario" "$CONF" || fail "the upgrade replaced the edited conffile"
# postinst: `deb-systemd-invoke try-restart meshlb.service` under systemd.
unit_stop
bb sleep 2 # forwarding with no daemon at all
unit_start v2
# status reads the pins, so it lists "web" before the new daemon is up:
# wait for the daemon's own word that it adopted the links. It verifies
# both programs first: ~35 s under TCG, twice that on a loaded host.
wait_until 150 "the upgraded daemon adopting the pinned links" grep -q "adopted the pinned XDP link" "$LOGDIR/meshlb-v2.log"
wait_until 60 "the upgraded daemon's first sync" grep -q "applied .* changes" "$LOGDIR/meshlb-v2.log"
bb sleep 2
touch /tmp/loop.stop
i=0
while kill -0 $LOOP 2>/dev/null && [ $i -lt 50 ]; do
    bb usleep 200000
    i=$((i + 1))
done
kill -0 $LOOP 2>/dev/null && fail "the client loop did not stop"
total=$(grep -c . /tmp/loop.out)
failed=$(grep -c '^FAIL' /tmp/loop.out)
[ "$total" -ge 10 ] || fail "the client loop made only $total requests"
[ "$failed" = 0 ] || fail "$failed of $total requests failed during the upgrade: $(grep '^FAIL' /tmp/loop.out | head -n 5 | tr '\n' ' ')"
during=$(tally $(sed -n 's/^ok //p' /tmp/loop.out))

# -- cleanup and purge -----------------------------------------------------
unit_stop
must /usr/bin/meshlb cleanup --bpffs "$BPFFS"
get client http://10.96.0.10/ >/dev/null && fail "the VIP still answers after meshlb cleanup"
must dpkg --purge meshlb
[ -e /usr/bin/meshlb ] && fail "purge left /usr/bin/meshlb"
[ -e "$CONF" ] && fail "purge left $CONF"
pass "installed ${v1##* }, sandboxed (read-only but $SBX_RW, umask $SBX_UMASK), forwarded 20/20 (${seen% }), upgraded to ${v2##* } under load: $total requests, 0 failed (${during% }), conffile kept, links adopted; purged"
