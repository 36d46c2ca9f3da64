# `cargo xtask bench vm` in one guest: every path of the host benchmark
# that this kernel can carry, each through a namespace (lane) of its own,
# all up at once, so every round interleaves the paths (xtask/src/bench_vm.rs
# reads the files this writes to the `out` share and makes the results):
#
#   client ns cl:  cL 10.210.L.2 ---- lLc 10.210.L.1 [lane lL] lLb 10.211.L.1 ---- bL 10.211.L.2  backend ns be
#
#   L  lane  path            client dials (TCP :80 -> :8000, UDP :90 -> :9000)
#   1  l1    direct          10.211.1.2:8000 (plain forwarding, no rules)
#   2  l2    meshlb-native   VIP 10.96.0.2   meshlb XDP, native on both veths
#   3  l3    meshlb-generic  VIP 10.96.0.3   meshlb XDP, generic
#   4  l4    meshlb-ipvs     VIP 10.96.0.4   meshlb --dataplane ipvs (netlink)
#   5  l5    ipvsadm         VIP 10.96.0.5   kube-proxy's IPVS mode by hand:
#                                            kube-ipvs0 dummy, rr, masquerade
#   6  l6    iptables        VIP 10.96.0.6   nat PREROUTING DNAT (kube-proxy's
#                                            iptables mode)
#   7  l7    haproxy         VIP 10.96.0.7   HAProxy, mode tcp, one thread
#
# Backend: one nginx (1 worker, access_log off) on :8000 in `be`; UDP to
# :9000 is counted and dropped by a raw PREROUTING rule per backend veth.
# The client's and backend's veth ends have TX checksum offload off (hosts
# on a wire); the lanes keep the kernel's defaults.
#
# Args (key=value): rounds, secs (per run), conns (wrk), rate (paced
# client, requests/s), workloads (comma-free list joined by `+`:
# keepalive+cpr+udp+latency). Files in /mnt/out: meta.txt (key=value),
# <workload>-r<round>-<path>.txt (wrk's output, or the helper's JSON line
# and `delivered N`), or a line `FAILED <why>` for a run that failed.

ROUNDS=3 SECS=5 CONNS=32 RATE=200 WORKLOADS="keepalive cpr udp latency"
for a in "$@"; do
    case $a in
    rounds=*) ROUNDS=${a#*=} ;;
    secs=*) SECS=${a#*=} ;;
    conns=*) CONNS=${a#*=} ;;
    rate=*) RATE=${a#*=} ;;
    workloads=*) WORKLOADS=$(echo "${a#*=}" | tr + ' ') ;;
    *) fail "bench: unknown argument $a" ;;
    esac
done
. /mnt/host/vm/guest/bench-lib.sh

PATHS="direct meshlb-native meshlb-generic meshlb-ipvs ipvsadm iptables haproxy"
lane_of() {
    case $1 in
    direct) echo 1 ;; meshlb-native) echo 2 ;; meshlb-generic) echo 3 ;; meshlb-ipvs) echo 4 ;;
    ipvsadm) echo 5 ;; iptables) echo 6 ;; haproxy) echo 7 ;;
    esac
}
# target PATH PROTO: what the client dials.
target() {
    l=$(lane_of "$1")
    if [ "$1" = direct ]; then
        [ "$2" = tcp ] && echo "10.211.1.2:8000" || echo "10.211.1.2:9000"
    else
        [ "$2" = tcp ] && echo "10.96.0.$l:80" || echo "10.96.0.$l:90"
    fi
}

must modprobe -a veth dummy ip_vs ip_vs_rr ip_vs_mh nf_tables nft_chain_nat nft_compat xt_tcpudp
bench_users
netns cl
netns be
for p in $PATHS; do
    l=$(lane_of "$p")
    netns "l$l"
    wire cl "c$l" "10.210.$l.2/24" "l$l" "l${l}c" "10.210.$l.1/24"
    wire be "b$l" "10.211.$l.2/24" "l$l" "l${l}b" "10.211.$l.1/24"
    must ip -n cl route add "10.211.$l.0/24" via "10.210.$l.1"
    must ip -n cl route add "10.96.0.$l/32" via "10.210.$l.1"
    must ip -n be route add "10.210.$l.0/24" via "10.211.$l.1"
    must in_ns "l$l" /bin/busybox sysctl -qw net.ipv4.ip_forward=1
    must ipt be -t raw -A PREROUTING -i "b$l" -p udp --dport 9000 -j DROP
done
must in_ns cl /bin/busybox sysctl -qw net.ipv4.tcp_tw_reuse=1
must in_ns cl /bin/busybox sysctl -qw "net.ipv4.ip_local_port_range=1024 65535"
must in_ns be /bin/busybox sysctl -qw net.core.somaxconn=8192
nginx_start be 8000 b1

# meshlb: XDP native (lane 2: its veths' peers need XDP to take native
# redirects), XDP generic (lane 3), IPVS (lane 4).
for l in 2 3 4; do
    cat >"/tmp/meshlb-l$l.toml" <<EOF
node = "bench-l$l"

[[service]]
name = "web"
vip = "10.96.0.$l"
publish = [{ proto = "tcp", port = 80, target = 8000 }, { proto = "udp", port = 90, target = 9000 }]

[[service.backend]]
addr = "10.211.$l.2"
EOF
done
must in_ns cl "$MESHLB" xdp-pass --iface c2 --bpffs /sys/fs/bpf/pass
must in_ns be "$MESHLB" xdp-pass --iface b2 --bpffs /sys/fs/bpf/pass
lane_meshlb 2 --xdp-mode native
lane_meshlb 3 --xdp-mode generic
lane_meshlb 4 --dataplane ipvs
for l in 2 3; do wait_meshlb "$l"; done
wait_until 120 "meshlb IPVS service in l4" in_ns l4 /sbin/ipvsadm -Ln -t 10.96.0.4:80
# kube-proxy's IPVS mode, by hand: VIP on a dummy, rr, masquerade; and the
# sysctls kube-proxy sets for it.
must ip -n l5 link add kube-ipvs0 type dummy
must ip -n l5 addr add 10.96.0.5/32 dev kube-ipvs0
must ip -n l5 link set kube-ipvs0 up
must in_ns l5 /bin/busybox sysctl -qw net.ipv4.vs.conntrack=1
must in_ns l5 /sbin/ipvsadm -A -t 10.96.0.5:80 -s rr
must in_ns l5 /sbin/ipvsadm -a -t 10.96.0.5:80 -r 10.211.5.2:8000 -m
must in_ns l5 /sbin/ipvsadm -A -u 10.96.0.5:90 -s rr
must in_ns l5 /sbin/ipvsadm -a -u 10.96.0.5:90 -r 10.211.5.2:9000 -m
# kube-proxy's iptables mode: DNAT in PREROUTING, conntrack un-NATs.
must ipt l6 -t nat -A PREROUTING -d 10.96.0.6/32 -p tcp --dport 80 -j DNAT --to-destination 10.211.6.2:8000
must ipt l6 -t nat -A PREROUTING -d 10.96.0.6/32 -p udp --dport 90 -j DNAT --to-destination 10.211.6.2:9000
# HAProxy on its VIP (an address of the lane's loopback).
must ip -n l7 addr add 10.96.0.7/32 dev lo
must in_ns l7 /bin/busybox sysctl -qw net.ipv4.tcp_tw_reuse=1
must in_ns l7 /bin/busybox sysctl -qw "net.ipv4.ip_local_port_range=1024 65535"
haproxy_start l7 10.96.0.7:80 10.211.7.2:8000

# Every path answers before the first round (a path that does not is
# still run, and its runs are reported as failed).
for p in $PATHS; do
    if in_ns cl /bin/busybox timeout 5 /bin/busybox wget -q -O /dev/null "http://$(target "$p" tcp)/"; then
        log "bench: $p answers"
    else
        log "bench: $p does not answer"
    fi
done

{
    echo "kernel=$(uname -r)"
    echo "machine=$(uname -m)"
    echo "cpus=$(grep -c ^processor /proc/cpuinfo)"
    echo "mem_kib=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
    echo "wrk=$(/usr/bin/wrk -v 2>&1 | head -n 1)"
    echo "nginx=$(/usr/sbin/nginx -v 2>&1 | head -n 1)"
    echo "haproxy=$(/usr/sbin/haproxy -v 2>&1 | head -n 1)"
    echo "ipvsadm=$(/sbin/ipvsadm --version 2>&1 | head -n 1)"
    echo "iptables=$(/usr/sbin/xtables-nft-multi iptables --version 2>&1 | head -n 1)"
    echo "xdp_l2=l2c:$(xdp_mode l2c l2) l2b:$(xdp_mode l2b l2)"
    echo "xdp_l3=l3c:$(xdp_mode l3c l3) l3b:$(xdp_mode l3b l3)"
    echo "nic_driver_l2=$(in_ns l2 /sbin/ethtool -i l2c 2>/dev/null | awk '/^driver/ {print $2}')"
} >/mnt/out/meta.txt

for w in $WORKLOADS; do
    r=1
    while [ "$r" -le "$ROUNDS" ]; do
        for p in $PATHS; do
            [ "$w" = udp ] && [ "$p" = haproxy ] && continue
            f="/mnt/out/$w-r$r-$p.txt"
            case $w in
            keepalive) run_wrk "$f" "$(target "$p" tcp)" ;;
            cpr) run_wrk "$f" "$(target "$p" tcp)" close ;;
            latency) run_paced "$f" "$(target "$p" tcp)" ;;
            udp) run_udp "$f" "$(target "$p" udp)" "b$(lane_of "$p")" ;;
            *) fail "bench: unknown workload $w" ;;
            esac
            log "bench: $w round $r $p: $(head -c 300 "$f" | tr '\n' ' ' | cut -c1-160)"
        done
        r=$((r + 1))
    done
done
sync
pass "bench: $ROUNDS round(s) of $WORKLOADS over $(echo $PATHS | wc -w) paths"
