#!/usr/bin/env bash
# The test suite: installs what it needs when missing (Open MPI and libclang for the `mpi`
# feature, Mesa's lavapipe Vulkan driver for the `wgpu` feature's tests on a machine without a
# GPU, iproute2/util-linux for the two-host test in network namespaces; as root, or with sudo),
# then runs every test once from one build.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v mpirun >/dev/null || need+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/openmpi/mpi.h ] || ls /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h >/dev/null 2>&1 || need+=(libopenmpi-dev)
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || need+=(libclang-dev)
command -v ip >/dev/null || need+=(iproute2)
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers libvulkan1)
command -v unshare >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing ${need[*]}"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${need[@]}"
fi
exec cargo test --workspace --features mpi,wgpu "$@"
