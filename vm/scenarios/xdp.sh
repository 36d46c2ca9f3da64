# XDP data plane on one guest (x86_64-xdp, aarch64-xdp, armv7-xdp): the
# guest's own namespace is the load balancer, like tests/common/mod.rs:
#
#   client ns 10.200.0.2 -- lbc 10.200.0.1 [meshlb, XDP native] lbbN 10.201.N.1 -- bN ns 10.201.N.2 :8000
#
# The client fetches the VIP 10.96.0.10:80 (routed to the LB, but no
# address of it: only meshlb's DNAT answers) and the published port on the
# LB's address; every request must reach a backend, both backends must
# answer. Native XDP on veth needs an XDP program on the receiving peer
# (`meshlb xdp-pass`) and TX checksum offload off on both ends.
#
# Args: one run per word: `default` (the kernel's bpf_jit_enable as booted),
# `jit0` or `jit1` (set net.core.bpf_jit_enable first; armv7 boots with
# the JIT off, so `jit0 jit1` runs the interpreter and then the JIT).

REQUESTS=20
BPFFS=/sys/fs/bpf/meshlb
[ $# -gt 0 ] || set -- default

lb_topology
lb_service >/tmp/meshlb.toml
lb_peers_xdp_pass "$MESHLB"

# Without meshlb nothing answers on the VIP: the check below can't pass by
# plain forwarding.
get client http://10.96.0.10/ && fail "the VIP answered before meshlb ran"

detail=
for run in "$@"; do
    case $run in
    jit0) echo 0 >/proc/sys/net/core/bpf_jit_enable || fail "cannot set bpf_jit_enable=0" ;;
    jit1) echo 1 >/proc/sys/net/core/bpf_jit_enable || fail "cannot set bpf_jit_enable=1" ;;
    default) ;;
    *) fail "unknown run $run" ;;
    esac
    jit=$(cat /proc/sys/net/core/bpf_jit_enable)
    log "run $run: bpf_jit_enable=$jit"
    t0=$(cut -d' ' -f1 /proc/uptime)
    meshlb_start "$run" --config /tmp/meshlb.toml --node vm --xdp-mode native \
        --iface lbc --iface lbb1 --iface lbb2 --bpffs "$BPFFS"
    meshlb_ready "$BPFFS" web
    t1=$(cut -d' ' -f1 /proc/uptime)
    for i in lbc lbb1 lbb2; do
        [ "$(xdp_mode $i)" = xdp ] || fail "run $run: $i has no native XDP program ($(xdp_mode $i))"
    done
    # The program is JIT-compiled only when the JIT was on when it loaded.
    jited=$(ip -d link show dev lbc | grep -o 'jited' | head -n 1)
    answers=
    i=0
    while [ $i -lt $REQUESTS ]; do
        url=http://10.96.0.10/
        [ $((i % 2)) = 1 ] && url=http://10.200.0.1/
        body=$(get client "$url") || fail "run $run: request $i to $url failed (after $i good ones)"
        case $body in b1 | b2) ;; *) fail "run $run: request $i to $url: unexpected answer '$body'" ;; esac
        answers="$answers $body"
        i=$((i + 1))
    done
    seen=$(tally $answers)
    case $seen in *b1=*b2=*) ;; *) fail "run $run: only one backend answered: $seen" ;; esac
    st=$("$MESHLB" status --json --bpffs "$BPFFS") || fail "run $run: meshlb status failed"
    dp=$(echo "$st" | grep -o '"dataplane": *"[a-z-]*"' | cut -d'"' -f4)
    [ "$dp" = xdp-native ] || fail "run $run: dataplane is '$dp', want xdp-native"
    meshlb_stop "$BPFFS"
    get client http://10.96.0.10/ >/dev/null && fail "run $run: the VIP still answers after cleanup"
    ready=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    detail="$detail[$run jit=$jit$([ -n "$jited" ] && echo ' jited') $dp ready=${ready}s $REQUESTS/$REQUESTS ok: ${seen% }] "
done
pass "${detail% }"
