#!/usr/bin/env bash
# gpio-sim as an out-of-tree module for the arm64 Debian kernel of an image, cross-built on
# the host:
#   bash ci/gpio-sim-module.sh VMLINUZ OUT_DIR      -> OUT_DIR/gpio-sim.ko
#
# Debian's arm64 kernels build neither CONFIG_GPIO_SIM nor CONFIG_IRQ_SIM, so the board
# layer's gpio-sim test and the agent's trigger -> verdict path cannot run on the emulated
# board without this. The kernel release and its Debian version are read from VMLINUZ's
# banner ("Linux version 6.1.0-50-arm64 ... Debian 6.1.176-1"); that exact version of
# linux-headers-<release> (arm64), linux-headers-<abi>-common, linux-kbuild-<x.y> (amd64, the
# host-side scripts) and linux-source-<x.y> come from deb.debian.org through apt with its own
# state in OUT_DIR (the host's sources and architectures stay as they are). gpio-sim.c and
# kernel/irq/irq_sim.c are linked into one gpio_sim module; irq_sim.c is compiled through a
# few lines of wrapper because the one symbol it needs that the kernel does not export,
# irq_to_desc(), has an exported equivalent. Nothing from the kernel tree is kept in git.
# The module is unsigned: the kernel taints but loads it (no secure boot, so no lockdown).
# Cached: a second run with the same kernel only checks the stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
vmlinuz=${1:?usage: gpio-sim-module.sh VMLINUZ OUT_DIR}
out=${2:?usage: gpio-sim-module.sh VMLINUZ OUT_DIR}
mkdir -p "$out"
out=$(realpath "$out")

banner=$( { if [ "$(head -c2 "$vmlinuz" | od -An -tx1 | tr -d ' ')" = 1f8b ]; then zcat "$vmlinuz"; else cat "$vmlinuz"; fi; } \
  | strings | grep -m1 '^Linux version ' || true)
release=$(sed -n 's/^Linux version \([^ ]*\) .*/\1/p' <<<"$banner")
debver=$(sed -n 's/.* Debian \([^ ]*\) .*/\1/p' <<<"$banner")
if [ -z "$release" ] || [ -z "$debver" ] || [ "${release##*-}" != arm64 ]; then
  echo "gpio-sim-module.sh: $vmlinuz is not a Debian arm64 kernel (banner: ${banner:-none})" >&2
  exit 2
fi
series=$(cut -d. -f1,2 <<<"$release")          # 6.1
abi=${release%-arm64}                           # 6.1.0-50
stamp="$release $debver"
if [ -f "$out/gpio-sim.ko" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "gpio-sim.ko for $release ($debver): cached in $out"
  exit 0
fi
echo "gpio-sim.ko for $release (Debian $debver)"

. ci/apt.sh
apt_install gcc-12-aarch64-linux-gnu binutils-aarch64-linux-gnu make xz-utils

# apt with its own state: both architectures, bookworm and its security suite.
apt_dir="$out/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$out/debs"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
cat > "$apt_dir/sources.list" <<EOF
deb [arch=amd64,arm64 signed-by=$keyring] http://deb.debian.org/debian bookworm main
deb [arch=amd64,arm64 signed-by=$keyring] http://deb.debian.org/debian-security bookworm-security main
EOF
apt_opts=(-o APT::Architecture=amd64 -o APT::Architectures::=amd64 -o APT::Architectures::=arm64
  -o Dir::State="$apt_dir" -o Dir::State::Lists="$apt_dir/lists" -o Dir::State::status=/dev/null
  -o Dir::Cache="$apt_dir" -o Dir::Cache::Archives="$apt_dir/archives"
  -o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
debs=("linux-headers-$release:arm64=$debver" "linux-headers-$abi-common=$debver"
  "linux-kbuild-$series:amd64=$debver" "linux-source-$series=$debver")
missing=0
for d in "${debs[@]}"; do
  name=${d%%=*}; name=${name%%:*}
  ls "$out/debs/${name}_${debver}_"*.deb >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
  apt-get "${apt_opts[@]}" update -qq
  if ! (cd "$out/debs" && apt-get "${apt_opts[@]}" download -qq "${debs[@]}"); then
    echo "gpio-sim-module.sh: the packages of kernel $release $debver are not on deb.debian.org" \
      "any more (a newer point release replaced them); rebuild the image's base rootfs" >&2
    exit 1
  fi
fi

# Headers (arm64), host tools (amd64) and the three source files, in one scratch root.
root="$out/root"
rm -rf "$root" "$out/build"
mkdir -p "$root" "$out/build"
for d in "$out/debs"/linux-headers-*"_$debver"_*.deb "$out/debs/linux-kbuild-${series}_${debver}_amd64.deb"; do
  dpkg-deb -x "$d" "$root"
done
kdir="$root/usr/src/linux-headers-$release"
# The flavour's Makefile includes the common one by its installed path.
sed -i "s|^include /usr/src/|include $root/usr/src/|" "$kdir/Makefile"
dpkg-deb --fsys-tarfile "$out/debs/linux-source-${series}_${debver}_all.deb" \
  | tar -xO "./usr/src/linux-source-$series.tar.xz" \
  | tar -xJ -C "$out/build" --strip-components=3 \
    "linux-source-$series/drivers/gpio/gpio-sim.c" "linux-source-$series/drivers/gpio/gpiolib.h" \
    "linux-source-$series/kernel/irq/irq_sim.c"
# One module named gpio_sim (as the in-tree one) from both files; kbuild wants the parts
# named differently from the module.
mv "$out/build/gpio-sim.c" "$out/build/gpio-sim-main.c"
mv "$out/build/irq_sim.c" "$out/build/irq_sim_upstream.c"
cat > "$out/build/Kbuild" <<'EOF'
obj-m := gpio-sim.o
gpio-sim-y := gpio-sim-main.o irq_sim.o
EOF
cat > "$out/build/irq_sim.c" <<'EOF'
// irq_sim.c as part of the gpio_sim module: irq_to_desc() is not exported since 5.11.
#include <linux/irq.h>
#include <linux/irqdesc.h>
static inline struct irq_desc *irq_sim_to_desc(unsigned int irq)
{
	return irq_data_to_desc(irq_get_irq_data(irq));
}
#define irq_to_desc irq_sim_to_desc
#include "irq_sim_upstream.c"
EOF
make -s -C "$kdir" M="$out/build" ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- modules 2>&1 \
  | grep -v '^Skipping BTF generation' || true
[ -f "$out/build/gpio-sim.ko" ] || { echo "gpio-sim-module.sh: the module did not build" >&2; exit 1; }
aarch64-linux-gnu-strip --strip-debug -o "$out/gpio-sim.ko" "$out/build/gpio-sim.ko"
vermagic=$(strings "$out/gpio-sim.ko" | sed -n 's/^vermagic=//p')
case "$vermagic" in
  "$release "*) ;;
  *) echo "gpio-sim-module.sh: built for '$vermagic', not $release" >&2; exit 1 ;;
esac
echo "$stamp" > "$out/stamp"
rm -rf "$root"
echo "gpio-sim.ko for $release: $out/gpio-sim.ko ($(stat -c %s "$out/gpio-sim.ko") bytes, vermagic $vermagic)"
