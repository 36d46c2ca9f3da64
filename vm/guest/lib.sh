# Helpers for the guest scenarios (sourced by vm/guest/init.sh; busybox sh).
#
# A scenario ends with `pass DETAIL` or `fail DETAIL`; init.sh turns that
# into the one `MESHLB-VM-RESULT <scenario> PASS|FAIL <detail>` line. Every
# wait here is bounded.

# busybox sh runs its own applets before PATH: name the real tools.
ip() { /bin/ip "$@"; }
ethtool() { /sbin/ethtool "$@"; }
modprobe() { /sbin/modprobe "$@"; }
ipvsadm() { /sbin/ipvsadm "$@"; }
bb() { /bin/busybox "$@"; }

MESHLB=/mnt/host/meshlb
LOGDIR=/tmp/log
mkdir -p "$LOGDIR"

log() { echo "[$(cut -d' ' -f1 /proc/uptime)] $*"; }

# A `fail` inside $(...) only ends that subshell: the first FAIL written
# stays the result, and a later `pass` cannot overwrite it.
pass() {
    grep -q '^FAIL' /tmp/result 2>/dev/null && exit 1
    echo "PASS $*" >/tmp/result
    exit 0
}

fail() {
    grep -q '^FAIL' /tmp/result 2>/dev/null || echo "FAIL $*" >/tmp/result
    exit 1
}

# must CMD...: run it, fail the scenario (with its output) if it fails.
must() {
    out=$("$@" 2>&1) || fail "\`$*\` failed: $(echo "$out" | tail -n 3 | tr '\n' ' ')"
    [ -n "$out" ] && echo "$out"
    return 0
}

# wait_until SECS WHAT CMD...: retry CMD every 0.2 s until it succeeds.
wait_until() {
    secs=$1
    what=$2
    shift 2
    end=$(($(cut -d. -f1 /proc/uptime) + secs))
    until "$@" >/dev/null 2>&1; do
        if [ "$(cut -d. -f1 /proc/uptime)" -ge "$end" ]; then
            fail "timed out after ${secs}s waiting for $what"
        fi
        bb usleep 200000
    done
}

# in_ns NS CMD...: run CMD in netns NS without remounting /sys (bpffs pins
# stay visible), unlike `ip netns exec`.
in_ns() {
    ns=$1
    shift
    bb nsenter --net="/run/netns/$ns" "$@"
}

# veth NS_A IF_A ADDR_A NS_B IF_B ADDR_B: a veth pair (NS "-" = this
# namespace, the node). The other namespaces play hosts on a wire (the
# client, servers), which deliver complete checksums: TX checksum offload
# off there; the node's own end keeps the kernel's defaults.
veth() {
    must ip link add "$2" type veth peer name "$5"
    for end in "$1 $2 $3" "$4 $5 $6"; do
        set -- $end
        if [ "$1" != - ]; then
            must ip link set "$2" netns "$1"
            must ip -n "$1" addr add "$3" dev "$2"
            must in_ns "$1" /sbin/ethtool -K "$2" tx off >/dev/null
            must ip -n "$1" link set "$2" up
        else
            must ip addr add "$3" dev "$2"
            must ip link set "$2" up
        fi
    done
}

# netns NAME: a namespace with loopback up.
netns() {
    must ip netns add "$1"
    must ip -n "$1" link set lo up
}

# httpd NS NAME PORT: busybox httpd in NS answering NAME on every path.
httpd() {
    mkdir -p "/tmp/www/$2"
    echo "$2" >"/tmp/www/$2/index.html"
    in_ns "$1" /bin/busybox httpd -f -p "$3" -h "/tmp/www/$2" >"$LOGDIR/httpd-$2.log" 2>&1 &
    wait_until 10 "httpd $2 in $1" in_ns "$1" /bin/busybox wget -q -O /dev/null "http://127.0.0.1:$3/"
}

# get NS URL: the body of one HTTP GET from NS (5 s deadline; busybox
# `wget -T` crashes, so the deadline is `timeout`'s).
get() {
    in_ns "$1" /bin/busybox timeout 5 /bin/busybox wget -q -O - "$2" 2>/dev/null
}

# meshlb_start LOGNAME ARGS...: `meshlb run ARGS` in the background;
# MESHLB_PID is its pid.
meshlb_start() {
    name=$1
    shift
    RUST_LOG=${RUST_LOG:-info} "$MESHLB" run "$@" >"$LOGDIR/meshlb-$name.log" 2>&1 &
    MESHLB_PID=$!
    # Its log on the console too: a guest killed at the host's deadline
    # leaves nothing else behind.
    bb tail -f "$LOGDIR/meshlb-$name.log" 2>/dev/null | while read -r l; do echo "[meshlb $name] $l"; done &
}

# meshlb_ready BPFFS SERVICE: wait until status lists SERVICE (and the
# daemon is still alive). Under TCG the kernel verifies meshlb's programs
# in ~45 s (TC load balancer ~30 s, XDP ~15 s on x86_64-mesh3; the daemon
# logs each); 180 s leaves room for two guests sharing two host cores.
meshlb_ready() {
    end=$(($(cut -d. -f1 /proc/uptime) + 180))
    until "$MESHLB" status --json --bpffs "$1" 2>/dev/null | grep -q "\"name\": *\"$2\""; do
        kill -0 "$MESHLB_PID" 2>/dev/null || fail "meshlb exited before it was ready: $(tail -n 5 "$LOGDIR"/meshlb-*.log | tr '\n' ' ')"
        [ "$(cut -d. -f1 /proc/uptime)" -ge "$end" ] && fail "meshlb not ready within 180s"
        bb usleep 250000
    done
}

# stop_pid PID: SIGTERM, then up to 10 s for it to exit; non-zero if it
# is still running.
stop_pid() {
    _sp=0
    kill "$1" 2>/dev/null
    while kill -0 "$1" 2>/dev/null && [ $_sp -lt 50 ]; do
        bb usleep 200000
        _sp=$((_sp + 1))
    done
    ! kill -0 "$1" 2>/dev/null
}

# lb_topology: the single-node load-balancer topology (xdp.sh, package.sh),
# this namespace being the LB, IPv4 forwarding on:
#   client ns 10.200.0.2 -- lbc 10.200.0.1 [LB] lbbN 10.201.N.1 -- bN ns 10.201.N.2 :8000
# (N = 1, 2; busybox httpd in bN answers "bN"; the client routes
# 10.96.0.0/16, the VIPs, via the LB).
lb_topology() {
    must modprobe -a veth
    netns client
    veth client cli 10.200.0.2/24 - lbc 10.200.0.1/24
    must ip -n client route add 10.96.0.0/16 via 10.200.0.1
    for n in 1 2; do
        netns "b$n"
        veth "b$n" "b${n}e" "10.201.$n.2/24" - "lbb$n" "10.201.$n.1/24"
        must ip -n "b$n" route add default via "10.201.$n.1"
        httpd "b$n" "b$n" 8000
    done
    echo 1 >/proc/sys/net/ipv4/ip_forward
}

# lb_service: the TOML of lb_topology's service "web": VIP 10.96.0.10,
# tcp 80 -> 8000 on b1 and b2.
lb_service() {
    cat <<'EOF'
[[service]]
name = "web"
vip = "10.96.0.10"
publish = [{ proto = "tcp", port = 80, target = 8000 }]

[[service.backend]]
addr = "10.201.1.2"

[[service.backend]]
addr = "10.201.2.2"
EOF
}

# lb_peers_xdp_pass MESHLB: `MESHLB xdp-pass` on the client and backend
# ends of lb_topology's veths. Native redirect into a veth only delivers if
# its peer runs XDP. One pin directory for the three: each directory costs
# a full set of meshlb's maps (~220 MB), too much for a small guest.
lb_peers_xdp_pass() {
    for p in client:cli b1:b1e b2:b2e; do
        must in_ns "${p%%:*}" "$1" xdp-pass --iface "${p#*:}" --bpffs /sys/fs/bpf/pass
    done
}

# meshlb_stop BPFFS: stop the daemon (TERM, bounded wait, KILL) and remove
# its pins.
meshlb_stop() {
    if [ -n "$MESHLB_PID" ]; then
        stop_pid "$MESHLB_PID" || kill -9 "$MESHLB_PID" 2>/dev/null
        wait "$MESHLB_PID" 2>/dev/null
        MESHLB_PID=
    fi
    must "$MESHLB" cleanup --bpffs "$1" >/dev/null
}

# xdp_mode IFACE [NS]: "xdp" (native), "xdpgeneric", or nothing.
xdp_mode() {
    if [ -n "$2" ]; then l=$(ip -n "$2" link show dev "$1"); else l=$(ip link show dev "$1"); fi
    for w in $l; do
        case $w in xdp | xdpgeneric | xdpdrv | xdpoffload | xdpmulti) echo "$w" && return ;; esac
    done
}

# by_mac MAC: the name of the NIC with that MAC (names depend on probe
# order).
by_mac() {
    for d in /sys/class/net/*; do
        [ "$(cat "$d/address")" = "$1" ] && basename "$d" && return 0
    done
    return 1
}

# tally NAMES...: "a=3 b=2" from a list of answers.
tally() {
    for n in "$@"; do echo "$n"; done | sort | uniq -c | while read -r c n; do printf '%s=%s ' "$n" "$c"; done
}
