# `cargo xtask bench vm`, the routing mesh on three guests (one L2 segment,
# as x86_64-mesh3): a client on n3 reaches a task on n2 through n1's
# published port.
#
#   n1 10.210.0.1  the forwarding node: meshlb (XDP, then IPVS), and
#                  kube-proxy-style iptables DNAT + MASQUERADE on :8082
#   n2 10.210.0.2  the task node: bridge br0 10.222.0.1, task namespace t2
#                  10.222.0.2, nginx :8000 and :8001 (1 worker)
#   n3 10.210.0.3  the client (wrk)
#
# Paths: direct (n3 -> 10.222.0.2:8000, routed via n2), meshlb-xdp
# (10.210.0.1:80, XDP on n1's virtio NIC: DNAT + SNAT to n1's address,
# back out the same NIC), meshlb-ipvs (10.210.0.1:80, IPVS masquerading +
# meshlb's nf_tables masquerade), iptables (10.210.0.1:8082: nat
# PREROUTING MARK + DNAT, POSTROUTING MASQUERADE on the mark, as
# kube-proxy's iptables mode). The iptables path reaches the task's :8001:
# both NATs source-translate to n1's address and meshlb's XDP SNAT is
# outside conntrack, so on one target port the two could pick the same
# (n1, port) tuple while the task still holds it in TIME_WAIT; separate
# target ports keep the paths of this shared test bed independent. One data plane of meshlb runs at a time on
# n1, so each round is two phases: XDP (direct, meshlb-xdp, iptables
# interleaved), then IPVS (meshlb-ipvs, iptables).
#
# Coordination over HTTP marks on :9999 (busybox httpd): n1 publishes
# `phase` ("<round> xdp|ipvs", then "end"), n3 publishes `done` (the
# phase it finished, then "end" once it saw n1's), n2 `ready` (then
# "end"); n1 passes once both said "end", they once n1 is gone. Args: rounds=R secs=S conns=C
# workloads=keepalive+cpr. n3 writes /mnt/out/mesh-<workload>-r<round>-<path>.txt.

ROUNDS=3 SECS=5 CONNS=32 WORKLOADS="keepalive cpr"
for a in "$@"; do
    case $a in
    rounds=*) ROUNDS=${a#*=} ;;
    secs=*) SECS=${a#*=} ;;
    conns=*) CONNS=${a#*=} ;;
    workloads=*) WORKLOADS=$(echo "${a#*=}" | tr + ' ') ;;
    *) fail "bench-mesh: unknown argument $a" ;;
    esac
done
. /mnt/host/vm/guest/bench-lib.sh

BPFFS=/sys/fs/bpf/meshlb
i=${NODE#n}
case $i in 1 | 2 | 3) ;; *) fail "node name $NODE is not n1..n3" ;; esac
must modprobe -a veth bridge virtio_net dummy ip_vs ip_vs_mh nf_tables nft_chain_nat nft_compat xt_tcpudp xt_mark xt_MASQUERADE
bench_users
eth=$(by_mac 52:54:00:00:01:0$i) || fail "no NIC with MAC 52:54:00:00:01:0$i"
must ip addr add "10.210.0.$i/24" dev "$eth"
must ip link set "$eth" up
echo 1 >/proc/sys/net/ipv4/ip_forward
mkdir -p /tmp/mark
bb httpd -p "10.210.0.$i:9999" -h /tmp/mark
mark() { wget_q "http://10.210.0.$1:9999/$2"; }
wget_q() { bb timeout 3 /bin/busybox wget -q -O - "$1" 2>/dev/null; }
# wait_mark NODE NAME VALUE SECS
wait_mark() {
    end=$(($(cut -d. -f1 /proc/uptime) + $4))
    until [ "$(mark "$1" "$2")" = "$3" ]; do
        [ "$(cut -d. -f1 /proc/uptime)" -ge "$end" ] && fail "timed out after $4s waiting for n$1's $2 to be '$3' (it is '$(mark "$1" "$2")')"
        bb usleep 200000
    done
}

# stay_until_n1_is_gone: up (bounded) while n1 still shows its end mark,
# so n1 can read this node's.
stay_until_n1_is_gone() {
    end=$(($(cut -d. -f1 /proc/uptime) + 60))
    while [ "$(mark 1 phase)" = end ] && [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
        bb usleep 200000
    done
}

case $i in
2)
    must ip link add br0 type bridge
    must ip addr add 10.222.0.1/24 dev br0
    must ip link set br0 up
    netns t2
    must ip link add h0 type veth peer name eth0 netns t2
    must ip link set h0 master br0
    must ip link set h0 up
    must ip -n t2 addr add 10.222.0.2/24 dev eth0
    must ip -n t2 link set eth0 up
    must ip -n t2 route add default via 10.222.0.1
    must in_ns t2 /bin/busybox sysctl -qw net.core.somaxconn=8192
    nginx_start t2 8000 t2 8001
    echo ready >/tmp/mark/ready
    wait_mark 1 phase end $((ROUNDS * 900 + 600))
    # n1 powers off once both n2 and n3 said they saw its end.
    echo end >/tmp/mark/ready
    stay_until_n1_is_gone
    pass "bench-mesh n2: served the task until n1's end"
    ;;
3)
    must ip route add 10.222.0.0/24 via 10.210.0.2
    must /bin/busybox sysctl -qw net.ipv4.tcp_tw_reuse=1
    must /bin/busybox sysctl -qw "net.ipv4.ip_local_port_range=1024 65535"
    # The helpers run wrk in namespace `cl`: here that is the node itself.
    must ip netns attach cl 1
    wait_mark 2 ready ready 300
    r=1
    while [ "$r" -le "$ROUNDS" ]; do
        for phase in xdp ipvs; do
            wait_mark 1 phase "$r $phase" 900
            if [ $phase = xdp ]; then paths="direct meshlb-xdp iptables"; else paths="meshlb-ipvs iptables-ipvs"; fi
            for w in $WORKLOADS; do
                for p in $paths; do
                    case $p in
                    direct) t=10.222.0.2:8000 ;; meshlb-*) t=10.210.0.1:80 ;; iptables*) t=10.210.0.1:8082 ;;
                    esac
                    f="/mnt/out/mesh-$w-r$r-$p.txt"
                    if [ "$w" = cpr ]; then run_wrk "$f" "$t" close; else run_wrk "$f" "$t"; fi
                    log "bench-mesh: $w round $r $p: $(head -c 300 "$f" | tr '\n' ' ' | cut -c1-160)"
                done
            done
            echo "$r $phase" >/tmp/mark/done
        done
        r=$((r + 1))
    done
    wait_mark 1 phase end 300
    sync
    # n1 powers off once both n2 and n3 said they saw its end.
    echo end >/tmp/mark/done
    stay_until_n1_is_gone
    pass "bench-mesh n3: $ROUNDS round(s) of $WORKLOADS"
    ;;
1)
    must ip route add 10.222.0.0/24 via 10.210.0.2
    cat >/tmp/meshlb.toml <<'TOML'
node = "n1"

[[service]]
name = "web"
publish = [{ proto = "tcp", port = 80, target = 8000 }]

[[service.backend]]
addr = "10.222.0.2"
node = "n2"
TOML
    # kube-proxy's iptables mode for a NodePort: mark, DNAT, masquerade
    # the marked connections on the way out.
    must ipt_self -t nat -A PREROUTING -d 10.210.0.1/32 -p tcp --dport 8082 -j MARK --set-xmark 0x4000/0x4000
    must ipt_self -t nat -A PREROUTING -d 10.210.0.1/32 -p tcp --dport 8082 -j DNAT --to-destination 10.222.0.2:8001
    must ipt_self -t nat -A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
    {
        echo "kernel=$(uname -r)"
        echo "machine=$(uname -m)"
        echo "cpus=$(grep -c ^processor /proc/cpuinfo)"
        echo "nic_driver=$(/sbin/ethtool -i "$eth" | awk '/^driver/ {print $2}')"
    } >/mnt/out/mesh-meta.txt
    r=1
    while [ "$r" -le "$ROUNDS" ]; do
        for phase in xdp ipvs; do
            if [ $phase = xdp ]; then
                meshlb_start "n1-r$r-xdp" --config /tmp/meshlb.toml --node n1 --iface "$eth" --bpffs "$BPFFS"
                meshlb_ready "$BPFFS" web
                echo "xdp_mode_r$r=$(xdp_mode "$eth")" >>/mnt/out/mesh-meta.txt
            else
                meshlb_start "n1-r$r-ipvs" --config /tmp/meshlb.toml --node n1 --iface "$eth" --bpffs "$BPFFS" --dataplane ipvs
                wait_until 120 "IPVS programmed" /sbin/ipvsadm -Ln -t 10.210.0.1:80
            fi
            echo "$r $phase" >/tmp/mark/phase
            wait_mark 3 done "$r $phase" 900
            meshlb_stop "$BPFFS"
        done
        r=$((r + 1))
    done
    echo end >/tmp/mark/phase
    # n2 and n3 say they saw it, and power off once n1 is gone.
    wait_mark 2 ready end 120
    wait_mark 3 done end 120
    pass "bench-mesh n1: $ROUNDS round(s), XDP and IPVS phases"
    ;;
esac
