#!/bin/sh
# Prepares what the real-VM suite (tests/vm/vm.e2e.ts) needs, idempotently:
#  - qemu-system-x86, busybox-static and iproute2 (`ip netns` for the multicast scenario) from apt
#    (needs root; CI runs as root);
#  - a Debian cloud kernel (linux-image-6.1.*-cloud-amd64) unpacked into $VM_CACHE
#    with `dpkg -x` (never installed into the host);
#  - for the v86 guest (32-bit): seabios from apt, and Debian's i386 686 kernel (the package that
#    linux-image-686:i386 depends on, with the ne2k modules) and busybox-static:i386, downloaded
#    with `apt-get download` after `dpkg --add-architecture i386` and unpacked into $VM_CACHE/i386.
# Exits quickly when everything is already present. Prints `kernel: PATH` and `modules: DIR`, then
# `v86-kernel: PATH`, `v86-modules: DIR`, `v86-busybox: PATH` and `seabios: DIR` last.
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
    # A mirror caught mid-sync fails one index ("File has unexpected size"): try once more.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
      as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
}

need=
command -v qemu-system-x86_64 >/dev/null 2>&1 || need="$need qemu-system-x86"
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx nc || need="$need busybox-static"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
SEABIOS=/usr/share/seabios
[ -f "$SEABIOS/bios.bin" ] && [ -f "$SEABIOS/vgabios-stdvga.bin" ] || need="$need seabios"
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

# Downloads the package $1 (a name, may carry :arch) with apt-get download and unpacks it into
# $VM_CACHE/$2, replacing what was there. apt-get download writes into the current directory and,
# as root, drops privileges to _apt: the folder must be writable for it.
unpack() {
  dl=$(mktemp -d "$VM_CACHE/dl.XXXXXX")
  trap 'rm -rf "${tmp:-}" "${dl:-}"' EXIT
  chmod 777 "$dl"
  (cd "$dl" && apt-get download -qq "$1") || { apt_update_once; (cd "$dl" && apt-get download -qq "$1"); }
  set -- "$@" "$(ls "$dl"/*.deb 2>/dev/null | head -n1)"
  [ -n "$3" ] || { echo "setup.sh: apt-get download $1 gave no package" >&2; exit 1; }
  mkdir -p "$(dirname "$VM_CACHE/$2")"
  rm -rf "$VM_CACHE/$2.new"
  dpkg -x "$3" "$VM_CACHE/$2.new"
  rm -rf "$VM_CACHE/$2" "$dl"
  mv "$VM_CACHE/$2.new" "$VM_CACHE/$2"
}

# The v86 guest: v86 emulates a 32-bit PC with an ne2k NIC.
I386=$VM_CACHE/i386
find_v86_kernel() {
  for k in "$I386"/kernel/boot/vmlinuz-6.1.*-686; do
    [ -f "$k" ] || continue
    v86v=${k##*/vmlinuz-}
    d="$I386/kernel/lib/modules/$v86v/kernel/drivers/net/ethernet/8390"
    if [ -f "$d/8390.ko" ] && [ -f "$d/ne2k-pci.ko" ]; then
      echo "$k"; return 0
    fi
  done
  return 1
}
v86_busybox=$I386/busybox/bin/busybox
if ! v86_kernel=$(find_v86_kernel) || [ ! -x "$v86_busybox" ]; then
  if ! dpkg --print-foreign-architectures | grep -qx i386; then
    as_root dpkg --add-architecture i386
    apt_updated=
  fi
  # i386 package lists exist only after an update that followed --add-architecture.
  apt-cache show busybox-static:i386 >/dev/null 2>&1 || apt_update_once
  if ! v86_kernel=$(find_v86_kernel); then
    dep686() { apt-cache depends linux-image-686:i386 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-6\.1\.[^ :]*-686\)\(:i386\)\{0,1\}$/\1/p' | head -n1; }
    pkg=$(dep686)
    if [ -z "$pkg" ]; then apt_update_once; pkg=$(dep686); fi
    [ -n "$pkg" ] || { echo "setup.sh: cannot find the linux-image-6.1.*-686 package of linux-image-686:i386" >&2; exit 1; }
    unpack "$pkg:i386" i386/kernel
    v86_kernel=$(find_v86_kernel) || { echo "setup.sh: $pkg has no vmlinuz or ne2k modules" >&2; exit 1; }
  fi
  if [ ! -x "$v86_busybox" ]; then
    unpack busybox-static:i386 i386/busybox
    [ -x "$v86_busybox" ] || { echo "setup.sh: busybox-static:i386 has no bin/busybox" >&2; exit 1; }
  fi
fi

v=${kernel##*/vmlinuz-}
echo "kernel: $kernel"
echo "modules: $VM_CACHE/kernel/lib/modules/$v"
v86v=${v86_kernel##*/vmlinuz-}
echo "v86-kernel: $v86_kernel"
echo "v86-modules: $I386/kernel/lib/modules/$v86v"
echo "v86-busybox: $v86_busybox"
echo "seabios: $SEABIOS"
