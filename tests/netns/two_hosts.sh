#!/usr/bin/env bash
# Runs `kd-launch --hostfile ... --np 2 <args>` across two "hosts" on this machine: network
# namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2), each with its own host name (UTS
# namespace). mpirun runs in the first; it starts the Open MPI daemon of the second through an
# rsh agent that enters that namespace, as ssh would log into another machine. The file system
# is shared, as on a cluster with a shared home.
#
#   tests/netns/two_hosts.sh <kd-launch binary> <work dir> <kd-launch args after placement...>
#
# Needs root, iproute2, util-linux (unshare) and Open MPI; kd-launch built with --features mpi.
set -euo pipefail
bin=$1 work=$2
shift 2
mkdir -p "$work"
id=$$
nsA=kdA$id nsB=kdB$id
cleanup() {
  ip netns del "$nsA" 2>/dev/null || true
  ip netns del "$nsB" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$nsA"
ip netns add "$nsB"
ip link add "va$id" type veth peer name "vb$id"
ip link set "va$id" netns "$nsA"
ip link set "vb$id" netns "$nsB"
ip -n "$nsA" addr add 10.77.0.1/24 dev "va$id"
ip -n "$nsB" addr add 10.77.0.2/24 dev "vb$id"
for ns in "$nsA" "$nsB"; do ip -n "$ns" link set lo up; done
ip -n "$nsA" link set "va$id" up
ip -n "$nsB" link set "vb$id" up

# mpirun calls the agent as `<agent> [options] <host> <command...>`, like ssh.
agent=$work/netns-rsh
cat > "$agent" <<AGENT
#!/bin/sh
while [ \$# -gt 0 ]; do case "\$1" in -*) shift ;; *) break ;; esac; done
host=\$1; shift
case "\$host" in
  10.77.0.1) ns=$nsA; name=host-a ;;
  10.77.0.2) ns=$nsB; name=host-b ;;
  *) echo "netns-rsh: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec "\$ns" unshare --uts sh -c "hostname \$name; \$*"
AGENT
chmod +x "$agent"
printf '10.77.0.1 slots=1\n10.77.0.2 slots=1\n' > "$work/hosts"

mpi_args=(
  --mpirun-arg=--mca --mpirun-arg=plm_rsh_agent --mpirun-arg="$agent"
  --mpirun-arg=--mca --mpirun-arg=oob_tcp_if_include --mpirun-arg=10.77.0.0/24
  --mpirun-arg=--mca --mpirun-arg=btl_tcp_if_include --mpirun-arg=10.77.0.0/24
  --mpirun-arg=--mca --mpirun-arg=btl --mpirun-arg=tcp,self
)
ip netns exec "$nsA" unshare --uts sh -c 'hostname host-a; exec "$@"' sh \
  "$bin" --hostfile "$work/hosts" --np 2 "${mpi_args[@]}" "$@"
