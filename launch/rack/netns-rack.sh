#!/bin/sh
# An emulated rack on one Linux host: each "board" is a network namespace joined to a bridge by a veth
# pair, links shaped to 1 Gbit/s with tbf.  mpiexec (MPICH Hydra) reaches the boards through
# launch/rack/nsexec instead of ssh.  Needs root, iproute2 and tc.  (sch_netem, for added latency, is
# not in every kernel: this script uses it only when present.)
#
#   launch/rack/netns-rack.sh up 4        # boards board1..board4 at 10.77.0.11..14, bridge br-aflkd at 10.77.0.1
#   .venv/bin/mpiexec -launcher ssh -launcher-exec launch/rack/nsexec -iface br-aflkd \
#       -hosts board1,board2 -n 2 -genv UCX_TLS tcp,self -genv MPIR_CVAR_NOLOCAL 1 .venv/bin/aflkd bench layers
#   launch/rack/netns-rack.sh down 4
set -eu
action=${1:?usage: netns-rack.sh up|down BOARDS [RATE] [DELAY]}
boards=${2:?usage: netns-rack.sh up|down BOARDS [RATE] [DELAY]}
rate=${3:-1gbit}
delay=${4:-100us}
shape() {  # shape DEV [netns]: rate-limit egress; add delay where sch_netem exists
    ns=${2:-}
    run="tc"; [ -n "$ns" ] && run="ip netns exec $ns tc"
    if $run qdisc replace dev "$1" root netem delay "$delay" rate "$rate" limit 10000 2>/dev/null; then
        echo "  $1${ns:+ in $ns}: netem $rate, $delay"
    else
        $run qdisc replace dev "$1" root tbf rate "$rate" burst 256kb latency 10ms
        echo "  $1${ns:+ in $ns}: tbf $rate (no sch_netem in this kernel: no added delay)"
    fi
}
case $action in
up)
    ip link add br-aflkd type bridge 2>/dev/null || true
    ip addr replace 10.77.0.1/24 dev br-aflkd
    ip link set br-aflkd up
    i=1
    while [ "$i" -le "$boards" ]; do
        ip netns add "board$i" 2>/dev/null || true
        ip link add "veth$i" type veth peer name eth0 netns "board$i" 2>/dev/null || true
        ip link set "veth$i" master br-aflkd
        ip link set "veth$i" up
        ip netns exec "board$i" ip addr replace "10.77.0.$((10 + i))/24" dev eth0
        ip netns exec "board$i" ip link set eth0 up
        ip netns exec "board$i" ip link set lo up
        shape "veth$i"
        shape eth0 "board$i"
        i=$((i + 1))
    done ;;
down)
    i=1
    while [ "$i" -le "$boards" ]; do
        ip netns del "board$i" 2>/dev/null || true
        ip link del "veth$i" 2>/dev/null || true
        i=$((i + 1))
    done
    ip link del br-aflkd 2>/dev/null || true ;;
*) echo "usage: netns-rack.sh up|down BOARDS [RATE] [DELAY]" >&2; exit 2 ;;
esac
