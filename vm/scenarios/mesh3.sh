# The routing mesh across three guests (x86_64-mesh3), like tests/mesh.rs
# but with a kernel and a NIC per node:
#
#   L2 segment 10.210.0.0/24 (QEMU socket netdev, multicast, host netns)
#     n1 .1 (eth 52:54:00:00:01:01)   n2 .2   n3 .3   client .100 (2nd NIC of n1, own netns)
#   node nI: task bridge br0 10.22I.0.1/24, task namespace tI 10.22I.0.2 :8000
#            routes to the other nodes' task subnets via those nodes (host-gw)
#
# Every node runs `meshlb run` on its uplink and its task bridge, with
# service `web` (VIP 10.96.0.10, published tcp 80 -> 8000, tasks t1..t3
# each with its node) from etcd (arg `etcd`: etcd-server runs on n1, on
# the segment; n1 creates the service and the tasks with `meshlb service
# create` / `meshlb task add --node`, and every daemon watches it), or
# (arg `static`) from the same static config on every node. The client
# reaches every task
# through every node's published port (a task on another node is DNAT+SNAT
# to the forwarding node's address), and the VIP via n1.
#
# With the data plane argument `ipvs` (x86_64-mesh3-ipvs) the nodes run `meshlb run
# --dataplane ipvs`: IPVS masquerading, and meshlb's nf_tables
# masquerade for the tasks of the other nodes. Every task answers
# /cgi-bin/peer with its name and the source address it saw: a task on
# the forwarding node sees the client (10.210.0.100), a task on another
# node sees the forwarding node's address (SNAT), checked in IPVS mode.
#
# Coordination: each node serves /tmp/mark over busybox httpd on :9999 of
# its uplink address — `ready` once its daemon is programmed; n1 adds `done`
# when the client checks are over; n2 and n3 pass and power off when they
# see it, and n1 waits (bounded) until they are gone before it passes.

BPFFS=/sys/fs/bpf/meshlb
# Args: the data plane (xdp | ipvs), then the source (static | etcd).
MODE=${1:-xdp}
SOURCE=${2:-static}
ETCD=http://10.210.0.1:2379
i=${NODE#n}
case $i in 1 | 2 | 3) ;; *) fail "node name $NODE is not n1..n3" ;; esac

must modprobe -a veth bridge virtio_net
# The TC program on the task bridge: clsact and cls_bpf (Debian's 6.1
# kernel has no tcx links; meshlb falls back to a cls_bpf filter).
[ "$MODE" = ipvs ] || must modprobe -a sch_ingress cls_bpf
[ "$MODE" = ipvs ] && must modprobe -a ip_vs ip_vs_mh dummy

# This node's NIC, found by its MAC.
eth=$(by_mac 52:54:00:00:01:0$i) || fail "no NIC with MAC 52:54:00:00:01:0$i"
must ip addr add "10.210.0.$i/24" dev "$eth"
must ip link set "$eth" up
echo 1 >/proc/sys/net/ipv4/ip_forward

must ip link add br0 type bridge
must ip addr add "10.22$i.0.1/24" dev br0
must ip link set br0 up
netns "t$i"
must ip link add h0 type veth peer name eth0 netns "t$i"
must ip link set h0 master br0
must ip link set h0 up
must ip -n "t$i" addr add "10.22$i.0.2/24" dev eth0
must ip -n "t$i" link set eth0 up
must ip -n "t$i" route add default via "10.22$i.0.1"
for j in 1 2 3; do
    [ "$j" = "$i" ] || must ip route add "10.22$j.0.0/24" via "10.210.0.$j"
done
mkdir -p "/tmp/www/t$i/cgi-bin"
printf '#!/bin/busybox sh\necho "Content-Type: text/plain"\necho\necho "t%s $REMOTE_ADDR"\n' "$i" >"/tmp/www/t$i/cgi-bin/peer"
chmod +x "/tmp/www/t$i/cgi-bin/peer"
httpd "t$i" "t$i" 8000

case $SOURCE in
static)
    cat >/tmp/meshlb.toml <<'EOF'
[[service]]
name = "web"
vip = "10.96.0.10"
publish = [{ proto = "tcp", port = 80, target = 8000 }]

[[service.backend]]
addr = "10.221.0.2"
node = "n1"

[[service.backend]]
addr = "10.222.0.2"
node = "n2"

[[service.backend]]
addr = "10.223.0.2"
node = "n3"
EOF
    SRC="--config /tmp/meshlb.toml"
    ;;
etcd)
    if [ "$i" = 1 ]; then
        /usr/bin/etcd --name n1 --data-dir /tmp/etcd \
            --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
            --listen-peer-urls http://127.0.0.1:2380 \
            --initial-advertise-peer-urls http://127.0.0.1:2380 \
            --initial-cluster n1=http://127.0.0.1:2380 >"$LOGDIR/etcd.log" 2>&1 &
        wait_until 60 "etcd on n1" "$MESHLB" service ls --etcd "$ETCD"
        must "$MESHLB" service create web --vip 10.96.0.10 --publish tcp:80:8000 --etcd "$ETCD"
        # vweb: an announced VIP (SPEC "Highly available VIPs"); port 81,
        # since a published port is every node's (web has 80).
        must "$MESHLB" service create vweb --vip 10.96.0.20 --publish tcp:81:8000 --announce --etcd "$ETCD"
        for j in 1 2 3; do
            must "$MESHLB" task add web "10.22$j.0.2" --node "n$j" --id "t$j" --etcd "$ETCD"
            must "$MESHLB" task add vweb "10.22$j.0.2" --node "n$j" --id "v$j" --etcd "$ETCD"
        done
    fi
    SRC="--etcd $ETCD"
    ;;
*) fail "unknown source $SOURCE (static or etcd)" ;;
esac

if [ "$MODE" = ipvs ]; then
    meshlb_start "$NODE" $SRC --node "$NODE" --iface "$eth" --iface br0 --dataplane ipvs
    wait_until 120 "IPVS programmed (VIP with 3 tasks)" bb sh -c '[ "$(/sbin/ipvsadm -Ln -t 10.96.0.10:80 | grep -c Masq)" = 3 ]'
    dp=$(bb timeout 5 /bin/busybox wget -q -O - http://127.0.0.1:9742/metrics | grep -o 'meshlb_dataplane_info{kind="[a-z-]*"}' | cut -d'"' -f2)
    [ "$dp" = ipvs ] || fail "/metrics: meshlb_dataplane_info is '$dp', not ipvs"
    modes="conntrack=$(cat /proc/sys/net/ipv4/vs/conntrack)"
else
    meshlb_start "$NODE" $SRC --node "$NODE" --iface "$eth" --iface br0 --bpffs "$BPFFS"
    meshlb_ready "$BPFFS" web
    dp=$("$MESHLB" status --json --bpffs "$BPFFS" | grep -o '"dataplane": *"[a-z-]*"' | cut -d'"' -f4)
    modes="$eth=$(xdp_mode "$eth") br0=$(xdp_mode br0)"
fi
log "meshlb ready on $NODE: $dp, $modes"

mkdir -p /tmp/mark
echo ready >/tmp/mark/ready
bb httpd -p "10.210.0.$i:9999" -h /tmp/mark

if [ "$i" != 1 ]; then
    # Stay up (and forwarding) until n1's client is done.
    wait_until 240 "n1's done mark" bb wget -q -O /dev/null http://10.210.0.1:9999/done
    pass "$NODE: $dp ($modes), served until n1 was done"
fi

# n1: the client, on its own NIC on the segment, in its own namespace.
cif=$(by_mac 52:54:00:00:01:64) || fail "no client NIC (52:54:00:00:01:64)"
netns client
must ip link set "$cif" netns client
must ip -n client addr add 10.210.0.100/24 dev "$cif"
must ip -n client link set "$cif" up
must ip -n client route add 10.96.0.0/16 via 10.210.0.1
for j in 2 3; do
    wait_until 150 "n$j ready" get client "http://10.210.0.$j:9999/ready"
done

# Through each node's published port, until every task has answered (at
# most 40 requests per node; Maglev spreads the client's ports).
detail=
for j in 1 2 3 vip; do
    url=http://10.210.0.$j/cgi-bin/peer
    [ $j = vip ] && url=http://10.96.0.10/cgi-bin/peer
    via=$j
    [ $j = vip ] && via=1
    answers= n=0
    while [ $n -lt 40 ]; do
        body=$(get client "$url") || fail "request $n to $url failed (answers so far:$answers)"
        task=${body%% *} peer=${body#* }
        # busybox httpd listens dual-stack: "[::ffff:10.210.0.1]".
        peer=${peer#\[::ffff:} peer=${peer%\]}
        case $task in t1 | t2 | t3) ;; *) fail "$url answered '$body'" ;; esac
        want=10.210.0.$via
        [ "$task" = "t$via" ] && want=10.210.0.100
        if [ "$MODE" = ipvs ] && [ "$peer" != "$want" ]; then
            fail "$url: $task saw the client as $peer, not $want ($([ "$want" = 10.210.0.100 ] && echo 'local task: no SNAT' || echo "remote task: SNAT to n$via"))"
        fi
        body=$task
        answers="$answers $body"
        n=$((n + 1))
        case " $answers " in *" t1 "*) case " $answers " in *" t2 "*) case " $answers " in *" t3 "*) break ;; esac ;; esac ;; esac
    done
    seen=$(tally $answers)
    case $seen in *t1=*t2=*t3=*) ;; *) fail "$url: not every task answered in $n requests: $seen" ;; esac
    detail="$detail[$([ $j = vip ] && echo vip || echo n$j): $n ok, ${seen% }$([ "$MODE" = ipvs ] && echo ", peers ok")] "
done
# The announced VIP (etcd source): exactly one node, its owner, answers ARP
# for it (in IPVS mode every node holds it on meshlb0: meshlb sets
# arp_ignore/arp_announce on the uplink so the others stay silent), the
# unannounced VIP gets no ARP answer at all, and the client reaches the
# announced VIP on-link, without a route via a node.
if [ "$SOURCE" = etcd ]; then
    owner_of() { "$MESHLB" status --json --bpffs "$BPFFS" 2>/dev/null | tr -d ' \n' | grep -o '"vip":"10.96.0.20","owner":"n[123]"' | grep -o 'n[123]'; }
    wait_until 30 "an owner of the announced VIP 10.96.0.20" owner_of
    owner=$(owner_of)
    must ip -n client route add 10.96.0.20/32 dev "$cif"
    replies=$(in_ns client /bin/busybox arping -c 3 -w 4 -I "$cif" 10.96.0.20 2>&1)
    macs=$(echo "$replies" | grep -o 'reply from 10.96.0.20 \[[0-9a-f:]*\]' | grep -o '[0-9a-f:]\{17\}' | sort -u | tr '\n' ' ')
    [ "$macs" = "52:54:00:00:01:0${owner#n} " ] || fail "ARP for the announced VIP 10.96.0.20 (owner $owner): answered by [$macs], want only the owner's 52:54:00:00:01:0${owner#n}: $replies"
    other=$(in_ns client /bin/busybox arping -c 2 -w 3 -I "$cif" 10.96.0.10 2>&1 | grep -c 'reply from')
    [ "$other" = 0 ] || fail "ARP for the unannounced VIP 10.96.0.10 got $other answers"
    vbody=$(get client http://10.96.0.20:81/cgi-bin/peer) || fail "the announced VIP 10.96.0.20 did not answer on-link"
    case $vbody in t1* | t2* | t3*) ;; *) fail "10.96.0.20 answered '$vbody'" ;; esac
    detail="$detail[announced 10.96.0.20: owner $owner alone answers ARP ($macs), 10.96.0.10 none, on-link ${vbody%% *}] "
fi
echo done >/tmp/mark/done
gone() { ! bb timeout 3 /bin/busybox wget -q -O /dev/null "http://10.210.0.$1:9999/ready"; }
others_gone() { gone 2 && gone 3; }
wait_until 60 "n2 and n3 to power off" others_gone
pass "n1 $dp ($modes), services from $SOURCE; ${detail% }"
