#!/usr/bin/env bash
# Installs the system packages dsm needs to build and test, if missing:
#   libclang-dev            userfaultfd bindings (bindgen)
#   libibverbs-dev librdmacm-dev pkg-config   RDMA verbs transport
#   openssh-client openssh-server iproute2    launcher over SSH, network-namespace test cluster
#   patchelf                                  scripts/install.sh (libdsm's soname)
# With --for-tests, also the compilers and build tools the tests build user
# programs with: g++ (C++), gfortran (Fortran module), cmake (find_package),
# Open MPI's compiler and launcher (the Jacobi baseline, bench/jacobi-vs-mpi.sh).
# Idempotent and quiet when everything is present; uses sudo when not root.
set -euo pipefail

packages=(libclang-dev libibverbs-dev librdmacm-dev pkg-config gcc libc6-dev
          openssh-client openssh-server iproute2 procps patchelf)
if [ "${1:-}" = "--for-tests" ]; then
  packages+=(g++ gfortran cmake make openmpi-bin libopenmpi-dev)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then
    sudo=(sudo)
  else
    echo "install-deps: missing packages: ${missing[*]}; run as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
echo "install-deps: installing ${missing[*]}" >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
