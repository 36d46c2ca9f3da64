# The guest kernel's IPVS, without meshlb (x86_64-ipvs-kernel): the
# modules the IPVS data plane needs load, and ipvsadm can create, list and
# delete a virtual service over netlink. The hook for the IPVS data-plane
# scenarios: they start from a guest where this passes.

mods="ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_sh ip_vs_mh dummy veth"
must modprobe -a $mods
for m in $mods; do
    grep -q "^$m " /proc/modules || fail "module $m not loaded after modprobe"
done
# IPVS takes only real servers it has a unicast route to.
must ip link add d0 type dummy
must ip addr add 10.201.1.1/24 dev d0
must ip link set d0 up
must ipvsadm -A -t 10.96.0.10:80 -s mh
must ipvsadm -a -t 10.96.0.10:80 -r 10.201.1.2:8000 -m -w 100
out=$(ipvsadm -Ln) || fail "ipvsadm -Ln failed"
echo "$out"
echo "$out" | grep -q "TCP  10.96.0.10:80 mh" || fail "ipvsadm -Ln lacks the service: $(echo "$out" | tr '\n' ' ')"
echo "$out" | grep -q "10.201.1.2:8000 *Masq *100" || fail "ipvsadm -Ln lacks the real server"
must ipvsadm -C
[ "$(ipvsadm -Ln | grep -c TCP)" = 0 ] || fail "ipvsadm -C left services"
pass "modules: $mods; ipvsadm $(ipvsadm -v 2>/dev/null | grep -o 'v[0-9][0-9.]*' | head -n 1): add/list/clear ok; $(head -n 1 /proc/net/ip_vs | tr -s ' ')"
