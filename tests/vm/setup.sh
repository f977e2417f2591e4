#!/bin/sh
# Prepares what the real-VM suite (tests/vm/vm.e2e.ts) needs, idempotently:
#  - qemu-system-x86, busybox-static and iproute2 (`ip netns` for the multicast scenario) from apt
#    (needs root; CI runs as root);
#  - a Debian cloud kernel (linux-image-6.1.*-cloud-amd64) unpacked into $VM_CACHE
#    with `dpkg -x` (never installed into the host).
# Exits quickly when everything is already present. Prints `kernel: PATH` and `modules: DIR` last.
set -eu

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VM_CACHE=${VM_CACHE:-$ROOT/.cache/vm}
mkdir -p "$VM_CACHE"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else echo "setup.sh: need root for: $*" >&2; exit 1
  fi
}

apt_updated=
apt_update_once() {
  if [ -z "$apt_updated" ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
}

need=
command -v qemu-system-x86_64 >/dev/null 2>&1 || need="$need qemu-system-x86"
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx nc || need="$need busybox-static"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
if [ -n "$need" ]; then
  # Only refresh the package lists when apt does not know the packages yet.
  for p in $need; do
    apt-cache show "$p" >/dev/null 2>&1 || apt_update_once
  done
  # shellcheck disable=SC2086
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need
fi

# Kernel: reuse any already unpacked 6.1 cloud kernel with its virtio_net module.
find_kernel() {
  for k in "$VM_CACHE"/kernel/boot/vmlinuz-6.1.*-cloud-amd64; do
    [ -f "$k" ] || continue
    v=${k##*/vmlinuz-}
    if [ -n "$(find "$VM_CACHE/kernel/lib/modules/$v" -name 'virtio_net.ko*' 2>/dev/null | head -n1)" ]; then
      echo "$k"; return 0
    fi
  done
  return 1
}

if ! kernel=$(find_kernel); then
  dep() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-6\.1\.[^ ]*-cloud-amd64\)$/\1/p' | head -n1; }
  pkg=$(dep)
  if [ -z "$pkg" ]; then apt_update_once; pkg=$(dep); fi
  [ -n "$pkg" ] || { echo "setup.sh: cannot find a linux-image-6.1.*-cloud-amd64 package" >&2; exit 1; }
  tmp=$(mktemp -d "$VM_CACHE/dl.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # apt-get download writes into the current directory; as root it drops privileges to _apt,
  # so make the folder writable for it.
  chmod 777 "$tmp"
  (cd "$tmp" && apt-get download -qq "$pkg") || { apt_update_once; (cd "$tmp" && apt-get download -qq "$pkg"); }
  rm -rf "$VM_CACHE/kernel.new"
  dpkg -x "$tmp"/"$pkg"_*.deb "$VM_CACHE/kernel.new"
  rm -rf "$VM_CACHE/kernel"
  mv "$VM_CACHE/kernel.new" "$VM_CACHE/kernel"
  kernel=$(find_kernel) || { echo "setup.sh: $pkg has no vmlinuz or virtio_net module" >&2; exit 1; }
fi

v=${kernel##*/vmlinuz-}
echo "kernel: $kernel"
echo "modules: $VM_CACHE/kernel/lib/modules/$v"
