# Stage 2 of a meshlb guest: PID 1 after stage 1 (vm/initramfs-init) has
# switched to the guest tree (a tmpfs overlay on the 9p `root` share) with
# the host share at /mnt/host. Mounts the rest, loads modules, runs
# vm/scenarios/<script>.sh under a guest-side deadline, prints exactly one
# `MESHLB-VM-RESULT <scenario> PASS|FAIL <detail>` line and powers off.
#
# Kernel command line: meshlb.scenario=NAME (the result line's name),
# meshlb.script=FILE (vm/scenarios/FILE.sh; `shell` for a login shell),
# meshlb.node=NAME (hostname), meshlb.deadline=SECS (guest-side limit,
# below the host's), meshlb.args=A,B (comma-separated, to the script).

export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/opt/busybox
# The tree has busybox but not its applet links (nor util-linux's mount):
# link every applet, behind the tree's own tools in PATH.
/bin/busybox mkdir -p /opt/busybox
/bin/busybox --install -s /opt/busybox
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /dev/pts /sys/fs/bpf
mount -t devpts devpts /dev/pts
mount -t bpf bpf /sys/fs/bpf

SCENARIO=unknown SCRIPT= NODE=guest DEADLINE=300 ARGS=
for kv in $(cat /proc/cmdline); do
    case $kv in
    meshlb.scenario=*) SCENARIO=${kv#*=} ;;
    meshlb.script=*) SCRIPT=${kv#*=} ;;
    meshlb.node=*) NODE=${kv#*=} ;;
    meshlb.deadline=*) DEADLINE=${kv#*=} ;;
    meshlb.args=*) ARGS=$(echo "${kv#*=}" | tr , ' ') ;;
    esac
done
hostname "$NODE"
/bin/ip link set lo up
echo 1 >/proc/sys/kernel/printk_ratelimit 2>/dev/null
# The daemon and the scenarios live in /mnt/host (read-only).
export SCENARIO NODE ARGS

result() {
    echo
    echo "MESHLB-VM-RESULT $SCENARIO $*"
    sync
    /bin/busybox poweroff -f
}

if [ "$SCRIPT" = shell ]; then
    echo "meshlb guest $NODE ($(uname -m), kernel $(uname -r)); host share at /mnt/host;"
    echo "helpers: . /mnt/host/vm/guest/lib.sh; exit the shell to power off"
    cd /mnt/host && setsid -c /bin/busybox sh -l
    /bin/busybox poweroff -f
fi

file=/mnt/host/vm/scenarios/$SCRIPT.sh
[ -f "$file" ] || result "FAIL no scenario script $file"

# The scenario runs in its own shell under `timeout`, so a hang still ends
# with a result line (and diagnostics) before the host's deadline.
start=$(cut -d' ' -f1 /proc/uptime)
echo "meshlb guest $NODE: scenario $SCENARIO ($SCRIPT $ARGS), $(uname -m) $(uname -r), deadline ${DEADLINE}s"
timeout "$DEADLINE" /bin/busybox sh -c ". /mnt/host/vm/guest/lib.sh; . $file" "$SCRIPT" $ARGS
rc=$?
took=$(awk -v a="$start" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { printf "%.1f", b - a }')
if [ -s /tmp/result ]; then
    res=$(cat /tmp/result)
else
    res="FAIL scenario ended without a result (exit $rc$([ $rc -ge 124 ] && echo ', guest deadline'))"
fi
case $res in
PASS*) ;;
*)
    echo "----- diagnostics ($NODE) -----"
    for f in /tmp/log/*; do
        [ -f "$f" ] || continue
        echo "== $f"
        tail -n 30 "$f"
    done
    echo "== dmesg"
    dmesg | tail -n 30
    echo "----- end of diagnostics -----"
    ;;
esac
result "$res (guest ${took}s)"
