# `cargo xtask bench vm`, control plane: how long one daemon takes to
# program 1,000 services × 10 tasks, and its memory, on a guest sized like
# a Raspberry Pi (the xtask boots it with 1 GiB). The daemon starts on a
# config with no service (its programs loaded and attached to a veth),
# then the full config is written and SIGHUP sent: the sync is timed from
# the signal to the daemon's "config reloaded, N changes applied" line,
# and to `meshlb status` listing every service; VmRSS and VmHWM are read
# afterwards. Args: services=N tasks=T rounds=R. Writes
# /mnt/out/cp-r<round>.txt (key=value lines) or `FAILED <why>`.

SERVICES=1000 TASKS=10 ROUNDS=1
for a in "$@"; do
    case $a in
    services=*) SERVICES=${a#*=} ;;
    tasks=*) TASKS=${a#*=} ;;
    rounds=*) ROUNDS=${a#*=} ;;
    *) fail "bench-cp: unknown argument $a" ;;
    esac
done
. /mnt/host/vm/guest/bench-lib.sh

BPFFS=/sys/fs/bpf/cp
must modprobe -a veth
must ip link add cp0 type veth peer name cp1
must ip addr add 10.250.0.1/24 dev cp0
must ip link set cp0 up
must ip link set cp1 up

now() { cut -d' ' -f1 /proc/uptime; }
# big_config: SERVICES services, each a VIP and a published port, TASKS
# backends each (every address distinct, on nodes n1..n3: other nodes',
# as etcd records name them).
big_config() {
    echo 'node = "cp"'
    awk -v n="$SERVICES" -v t="$TASKS" 'BEGIN {
        for (i = 0; i < n; i++) {
            printf "\n[[service]]\nname = \"s%d\"\nvip = \"10.%d.%d.%d\"\n", i, 96 + int(i / 62500), int(i / 250) % 250, i % 250 + 1
            printf "publish = [{ proto = \"tcp\", port = %d, target = 8000 }]\n", 10000 + i
            for (j = 0; j < t; j++) {
                k = i * t + j
                printf "\n[[service.backend]]\naddr = \"10.%d.%d.%d\"\nnode = \"n%d\"\n", 128 + int(k / 62500), int(k / 250) % 250, k % 250 + 1, j % 3 + 1
            }
        }
    }'
}

r=1
while [ "$r" -le "$ROUNDS" ]; do
    f=/mnt/out/cp-r$r.txt
    echo 'node = "cp"' >/tmp/cp.toml
    # Not meshlb_start: its log copied to the serial console would slow
    # the guest down.
    RUST_LOG=info "$MESHLB" run --config /tmp/cp.toml --iface cp0 --bpffs "$BPFFS" >"$LOGDIR/meshlb-cp.log" 2>&1 &
    MESHLB_PID=$!
    log "bench-cp round $r: daemon started"
    wait_until 300 "the daemon programmed (empty config)" grep -q 'applied [0-9]* changes' "$LOGDIR/meshlb-cp.log"
    rss0=$(awk '/VmRSS/ {print $2}' "/proc/$MESHLB_PID/status")
    big_config >/tmp/cp.toml
    log "bench-cp round $r: config of $(grep -c '^\[\[service\]\]' /tmp/cp.toml) services written; SIGHUP"
    t0=$(now)
    kill -HUP "$MESHLB_PID"
    end=$(($(cut -d. -f1 /proc/uptime) + 600))
    # The reload's one line: "config reloaded, N changes applied", or
    # what failed.
    until grep -q 'SIGHUP: [ack]' "$LOGDIR/meshlb-cp.log"; do
        kill -0 "$MESHLB_PID" 2>/dev/null || break
        [ "$(cut -d. -f1 /proc/uptime)" -ge "$end" ] && break
        bb usleep 20000
    done
    t1=$(now)
    line=$(grep 'SIGHUP' "$LOGDIR/meshlb-cp.log" | tail -n 1)
    log "bench-cp round $r: after $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')s: $line"
    n=0
    echo "$line" | grep -q 'config reloaded' || end=0
    until [ "$n" -ge "$SERVICES" ]; do
        kill -0 "$MESHLB_PID" 2>/dev/null || break
        [ "$(cut -d. -f1 /proc/uptime)" -ge "$end" ] && break
        n=$("$MESHLB" status --json --bpffs "$BPFFS" 2>/dev/null | grep -c '"name": *"s[0-9]*"')
        [ "$n" -ge "$SERVICES" ] || bb usleep 100000
    done
    t2=$(now)
    if echo "$line" | grep -q 'config reloaded' && [ "$n" -ge "$SERVICES" ]; then
        {
            echo "services=$SERVICES"
            echo "tasks=$TASKS"
            echo "apply_logged_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
            echo "status_lists_all_s=$(awk -v a="$t0" -v b="$t2" 'BEGIN { printf "%.2f", b - a }')"
            echo "rss_empty_kib=$rss0"
            echo "rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$MESHLB_PID/status")"
            echo "hwm_kib=$(awk '/VmHWM/ {print $2}' "/proc/$MESHLB_PID/status")"
            echo "log=$line"
            echo "nofile=$(grep 'open-files limit' "$LOGDIR/meshlb-cp.log" | head -n 1 | sed 's/.*\] //')"
        } >"$f"
    else
        echo "FAILED no full sync (within 600s) (services listed: $n; last SIGHUP line: $line; daemon log: $(tail -n 3 "$LOGDIR/meshlb-cp.log" | tr '\n' ' '))" >"$f"
    fi
    log "bench-cp round $r: $(tr '\n' ' ' <"$f")"
    meshlb_stop "$BPFFS"
    r=$((r + 1))
done
sync
pass "bench-cp: $ROUNDS round(s), $SERVICES services x $TASKS tasks"
