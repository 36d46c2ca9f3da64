# Helpers of the benchmark scripts (vm/scenarios/bench*.sh; sourced after
# lib.sh). Results go to the writable 9p share `out` at /mnt/out, which
# only `cargo xtask bench vm` attaches.

XTASK=/mnt/host/xtask
mkdir -p /mnt/out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /mnt/out ||
    fail "bench: no writable share \`out\` (run by cargo xtask bench vm)"

# ipt NS ARGS...: iptables (nf_tables backend) in NS. The tree is unpacked,
# not configured: no alternatives, so the backend is named.
ipt() {
    ns=$1
    shift
    in_ns "$ns" /usr/sbin/xtables-nft-multi iptables -w "$@"
}

ipt_self() { /usr/sbin/xtables-nft-multi iptables -w "$@"; }

# wire HOST_NS HOST_IF HOST_ADDR LB_NS LB_IF LB_ADDR: a veth between a
# host on a wire (client or backend: complete checksums, TX checksum
# offload off) and a load balancer's namespace, which keeps the kernel's
# defaults (offloads on), as a node does.
wire() {
    must ip link add "$2" type veth peer name "$5"
    must ip link set "$2" netns "$1"
    must ip link set "$5" netns "$4"
    must ip -n "$1" addr add "$3" dev "$2"
    must ip -n "$4" addr add "$6" dev "$5"
    must in_ns "$1" /sbin/ethtool -K "$2" tx off >/dev/null
    must ip -n "$1" link set "$2" up
    must ip -n "$4" link set "$5" up
}

# bench_users: the tree has no /etc/passwd (nothing was configured); nginx
# looks its user up.
bench_users() {
    [ -s /etc/passwd ] || printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >/etc/passwd
    [ -s /etc/group ] || printf 'root:x:0:\nnogroup:x:65534:\n' >/etc/group
}

# nginx_start NS PORT BODY [PORT2]: nginx (the host benchmark's backend:
# 1 worker, access_log off, keep-alive without limit) answering BODY on
# PORT (and PORT2).
nginx_start() {
    d=/tmp/nginx-$1
    extra=
    [ -n "$4" ] && extra="listen $4 reuseport backlog=8192;"
    mkdir -p "$d"
    cat >"$d/nginx.conf" <<NGINX
daemon off;
master_process on;
user root;
worker_processes 1;
worker_rlimit_nofile 65536;
pid $d/nginx.pid;
error_log $LOGDIR/nginx-error-$1.log info;
events { worker_connections 16384; multi_accept on; }
http {
    access_log off;
    client_body_temp_path $d/body;
    proxy_temp_path $d/proxy;
    fastcgi_temp_path $d/fastcgi;
    uwsgi_temp_path $d/uwsgi;
    scgi_temp_path $d/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 65s;
    tcp_nodelay on;
    server {
        listen $2 reuseport backlog=8192;
        $extra
        default_type text/plain;
        location / { return 200 "$3\n"; }
    }
}
NGINX
    in_ns "$1" /usr/sbin/nginx -p "$d" -c "$d/nginx.conf" -e "$LOGDIR/nginx-error-$1.log" >"$LOGDIR/nginx-$1.log" 2>&1 &
    wait_until 20 "nginx in $1" in_ns "$1" /bin/busybox wget -q -O /dev/null "http://127.0.0.1:$2/"
    [ -z "$4" ] || wait_until 20 "nginx in $1 on $4" in_ns "$1" /bin/busybox wget -q -O /dev/null "http://127.0.0.1:$4/"
}

# haproxy_start NS BIND SERVER: HAProxy in TCP mode, one thread (the host
# benchmark's configuration).
haproxy_start() {
    cat >"/tmp/haproxy-$1.cfg" <<HAP
global
    maxconn 4000
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend fe
    bind $2
    default_backend be

backend be
    server s1 $3
HAP
    in_ns "$1" /usr/sbin/haproxy -db -f "/tmp/haproxy-$1.cfg" >"$LOGDIR/haproxy-$1.log" 2>&1 &
    wait_until 20 "haproxy in $1" in_ns "$1" /bin/busybox wget -q -O /dev/null "http://$2/"
}

# lane_meshlb L ARGS...: `meshlb run` in lane namespace lL on its two
# veths with /tmp/meshlb-lL.toml, pins in /sys/fs/bpf/meshlb-lL.
lane_meshlb() {
    l=$1
    shift
    RUST_LOG=info in_ns "l$l" "$MESHLB" run --config "/tmp/meshlb-l$l.toml" --iface "l${l}c" --iface "l${l}b" \
        --bpffs "/sys/fs/bpf/meshlb-l$l" "$@" >"$LOGDIR/meshlb-l$l.log" 2>&1 &
    eval "MESHLB_L$l=\$!"
}

# wait_meshlb L: until lane L's daemon lists service web.
wait_meshlb() {
    eval "MESHLB_PID=\$MESHLB_L$1"
    meshlb_ready "/sys/fs/bpf/meshlb-l$1" web
}

# run_wrk FILE HOST:PORT [close]: one wrk run from the client namespace;
# its output, or FAILED.
run_wrk() {
    if [ "$3" = close ]; then
        out=$(in_ns cl /bin/busybox timeout $((SECS + 30)) /usr/bin/wrk -t1 "-c$CONNS" "-d${SECS}s" -H "Connection: close" "http://$2/" 2>&1)
    else
        out=$(in_ns cl /bin/busybox timeout $((SECS + 30)) /usr/bin/wrk -t1 "-c$CONNS" "-d${SECS}s" "http://$2/" 2>&1)
    fi
    rc=$?
    if [ $rc -eq 0 ] && echo "$out" | grep -q 'Requests/sec'; then
        echo "$out" >"$1"
    else
        echo "FAILED wrk exit $rc: $(echo "$out" | tail -n 3 | tr '\n' ' ')" >"$1"
    fi
}

# run_paced FILE HOST:PORT: the paced client (connection per request) at
# RATE requests/s for SECS; its JSON line, or FAILED.
run_paced() {
    out=$(in_ns cl /bin/busybox timeout $((SECS + 30)) "$XTASK" bench-helper paced --target "$2" --rate "$RATE" --secs "$SECS" --workers 32 2>&1)
    rc=$?
    if [ $rc -eq 0 ] && echo "$out" | grep -q '"p50_us"'; then
        echo "$out" | grep '"p50_us"' >"$1"
    else
        echo "FAILED paced client exit $rc: $(echo "$out" | tail -n 3 | tr '\n' ' ')" >"$1"
    fi
}

# udp_count IFACE: datagrams the backend's raw rule on IFACE has dropped.
udp_count() {
    ipt be -t raw -L PREROUTING -v -x -n | awk -v i="$1" '$3 == "DROP" && $6 == i { print $1 }'
}

# run_udp FILE HOST:PORT BACKEND_IFACE: the socket blaster (one thread)
# for SECS; its JSON line and the datagrams that reached the backend.
run_udp() {
    before=$(udp_count "$3")
    out=$(in_ns cl /bin/busybox timeout $((SECS + 30)) "$XTASK" bench-helper udp-blast --target "$2" --secs "$SECS" --threads 1 2>&1)
    rc=$?
    after=$(udp_count "$3")
    if [ $rc -eq 0 ] && echo "$out" | grep -q '"sent"' && [ -n "$before" ] && [ -n "$after" ]; then
        { echo "$out" | grep '"sent"'; echo "delivered $((after - before))"; } >"$1"
    else
        echo "FAILED udp-blast exit $rc (counter $before -> $after): $(echo "$out" | tail -n 3 | tr '\n' ' ')" >"$1"
    fi
}
