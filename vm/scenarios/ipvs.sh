# The IPVS data plane on one guest (x86_64-ipvs): `meshlb run --dataplane
# ipvs` programs the guest kernel's IPVS over generic netlink (no ipvsadm;
# ipvsadm only checks here), VIPs on the dummy device meshlb0:
#
#   client ns 10.200.0.2 -- lbc 10.200.0.1 [meshlb, IPVS] lbbN 10.201.N.1 -- bN ns 10.201.N.2 :8000
#
# Four services, one per scheduler: web (maglev -> mh) 10.96.0.10:80,
# rr 10.96.0.11:81, wrr 10.96.0.12:82 (weights 3:1:1), sh 10.96.0.13:83
# (each also published on the node's addresses). Checks:
# every request answered and spread; rr even; wrr by weight; sh sticky for
# one client; a removed backend gets no new connections; the daemon killed
# and restarted while a client loops requests: 0 failures, and the
# kernel's IPVS connection entries survive (adopted, not flushed).

BPFFS=/sys/fs/bpf/meshlb
must modprobe -a ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh ip_vs_mh dummy veth
netns client
veth client cli 10.200.0.2/24 - lbc 10.200.0.1/24
must ip -n client route add 10.96.0.0/16 via 10.200.0.1
for n in 1 2 3; do
    netns "b$n"
    veth "b$n" eth0 "10.201.$n.2/24" - "lbb$n" "10.201.$n.1/24"
    must ip -n "b$n" route add default via "10.201.$n.1"
    httpd "b$n" "b$n" 8000
done
echo 1 >/proc/sys/net/ipv4/ip_forward

config() { # config BACKENDS_OF_WEB...
    for s in "web 10 maglev 80" "rr 11 rr 81" "wrr 12 wrr 82" "sh 13 sh 83"; do
        set -- $s
        echo "[[service]]"
        echo "name = \"$1\""
        echo "vip = \"10.96.0.$2\""
        echo "publish = [{ proto = \"tcp\", port = $4, target = 8000 }]"
        echo "scheduler = \"$3\""
        for b in $WEB; do
            w=100
            [ "$1" = wrr ] && [ "$b" = 1 ] && w=300
            echo "[[service.backend]]"
            echo "addr = \"10.201.$b.2\""
            echo "weight = $w"
        done
    done
}
WEB="1 2 3" config >/tmp/meshlb.toml

# GETS N VIP: N requests from the client; prints the tally; fails on any error.
gets() {
    answers=
    i=0
    while [ $i -lt "$1" ]; do
        body=$(get client "http://$2/") || fail "request $i to $2 failed (after $i good ones)"
        answers="$answers $body"
        i=$((i + 1))
    done
    tally $answers
}
count() { # count NAME TALLY
    for kv in $2; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}" && return; done
    echo 0
}

get client http://10.96.0.10/ && fail "the VIP answered before meshlb ran"
t0=$(cut -d' ' -f1 /proc/uptime)
meshlb_start ipvs --config /tmp/meshlb.toml --node vm --dataplane ipvs --iface lbc --bpffs "$BPFFS" --metrics none
wait_until 120 "IPVS services programmed" bb sh -c '/sbin/ipvsadm -Ln | grep -q "10.96.0.13:83 sh"'
t1=$(cut -d' ' -f1 /proc/uptime)
ipvsadm -Ln

web=$(gets 300 10.96.0.10)
for b in b1 b2 b3; do
    [ "$(count $b "$web")" -ge 60 ] || fail "web (mh): $b got less than 20% of 300: $web"
done
# within N ± D: between LO and HI
within() { [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]; }
# rr and wrr are exact per scheduling decision; a connection the kernel
# schedules twice (a retried SYN) shifts the sequence by one, hence ±1-2.
rr=$(gets 30 10.96.0.11:81)
for b in b1 b2 b3; do
    within "$(count $b "$rr")" 9 11 || fail "rr: not even over 30: $rr"
done
wrr=$(gets 50 10.96.0.12:82)
within "$(count b1 "$wrr")" 27 33 && within "$(count b2 "$wrr")" 8 12 && within "$(count b3 "$wrr")" 8 12 ||
    fail "wrr 3:1:1 over 50: $wrr"
sh=$(gets 20 10.96.0.13:83)
case $sh in *=20\ ) ;; *) fail "sh: one client spread over several backends: $sh" ;; esac

# b3 removed from web: no new connections reach it.
WEB="1 2" config >/tmp/meshlb.toml
kill -HUP "$MESHLB_PID"
wait_until 30 "b3 to leave web" bb sh -c '! /sbin/ipvsadm -Ln -t 10.96.0.10:80 | grep -q 10.201.3.2'
after=$(gets 60 10.96.0.10)
[ "$(count b3 "$after")" = 0 ] || fail "removed b3 still got new connections: $after"

# Restart under load: a client loop, the daemon SIGKILLed and restarted.
conns=$(ipvsadm -Lnc | grep -c 10.96.0)
[ "$conns" -gt 0 ] || fail "no IPVS connection entries to watch"
in_ns client /bin/busybox sh -c 'i=0; f=0; while [ $i -lt 150 ]; do /bin/busybox timeout 5 /bin/busybox wget -q -O - http://10.96.0.10/ >/dev/null 2>&1 || f=$((f+1)); i=$((i+1)); done; echo $f >/tmp/loop-failures' &
loop=$!
bb usleep 300000
kill -9 "$MESHLB_PID"
wait "$MESHLB_PID" 2>/dev/null
kept=$(ipvsadm -Lnc | grep -c 10.96.0)
[ "$kept" -gt 0 ] || fail "IPVS connection entries gone after the daemon died"
meshlb_start ipvs2 --config /tmp/meshlb.toml --node vm --dataplane ipvs --iface lbc --bpffs "$BPFFS" --metrics none
bb usleep 2000000
wait "$loop"
failures=$(cat /tmp/loop-failures)
[ "$failures" = 0 ] || fail "$failures of 150 requests failed during the restart"
grep -q "applied 0 IPVS changes" "$LOGDIR/meshlb-ipvs2.log" ||
    fail "the restarted daemon changed IPVS instead of adopting it: $(grep -i ipvs "$LOGDIR/meshlb-ipvs2.log" | tr '\n' ' ')"
kill "$MESHLB_PID"
ready=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
pass "ready=${ready}s web(mh) ${web% }; rr ${rr% }; wrr ${wrr% }; sh ${sh% }; without b3 ${after% }; restart: 150 requests 0 failed, conn entries $conns -> $kept, adopted"
