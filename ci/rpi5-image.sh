#!/usr/bin/env bash
# The Raspberry Pi 5 image, built for real and checked as far as a machine without a Pi 5 can:
#   bash ci/rpi5-image.sh [--base ROOTFS.tar] [--no-build] [--no-boot]
#
# 1. cross-builds edgevlm for aarch64 (ci/cross.sh) and the host CLI (--no-build: uses the
#    ones in target/ as they are);
# 2. `edgevlm image build --board rpi5 --model models/demo` (mmdebstrap rootfs with the kernel
#    from trixie-backports, cached in target/rpi5-image/cache after the first run);
# 3. reads the image back: the boot partition's files, config.txt and cmdline.txt (mtools),
#    the RP1 GPIO / Ethernet / USB nodes of the Pi 5's device trees (dtc), and from the root
#    partition (debugfs) the apt pin, the dpkg diversions and the kernel's RP1, SD card,
#    Ethernet and USB driver modules;
# 4. boots the image's kernel, initrd and root filesystem in `qemu-system-aarch64 -M virt
#    -cpu cortex-a76` (the Pi 5's core) on a 4 GiB overlay, waits for ssh, checks the running
#    kernel is the image's and the system came up, then runs `update-initramfs -u` on the VM
#    and checks that the image's hook refreshed initrd.img on the boot partition and left
#    config.txt and cmdline.txt as they were.
# This is not a Pi 5: its firmware, SD card controller and RP1 are not emulated, so nothing
# here shows that the GPIO header, Ethernet or USB work on a board. Exit 0 when every check
# passed; the console log is target/rpi5-image/console.log.
set -euo pipefail
cd "$(dirname "$0")/.."

. ci/vm.sh
boot_vm=1
build=1
script_flag() {
  case "$1" in
    --no-boot) boot_vm=0 ;;
    --no-build) build=0 ;;
    *) return 1 ;;
  esac
}
vm_init "rpi5 image" target/rpi5-image "$@"

step "packages"
vm_packages device-tree-compiler

if [ "$build" = 1 ]; then
  step "builds"
  bash ci/cross.sh --no-test
  cargo build --release -j2 -q -p edgevlm
fi
edgevlm=target/release/edgevlm

step "image"
vm_ssh_key
rm -f "$work/edgevlm-rpi5.img"
$SUDO "$edgevlm" image build --board rpi5 --model models/demo --ssh-key "$work/id_ed25519.pub" \
  --hostname pi5-emu --cache "$work/cache" "${base_args[@]}" \
  --out "$work/edgevlm-rpi5.img" 2>&1 | tee "$work/build.log"
if grep -q '^image: warning:' "$work/build.log"; then
  echo "(the warnings above name what this kernel will not drive on a Pi 5)"
fi

step "boot partition"
boot="$work/edgevlm-rpi5.img@@4194304"
mdir -b -i "$boot" ::/ | sed 's|^::/||' | sort | tee "$work/boot-files.txt"
for f in vmlinuz initrd.img config.txt cmdline.txt bcm2712-rpi-5-b.dtb bcm2712d0-rpi-5-b.dtb; do
  grep -qx "$f" "$work/boot-files.txt" || fail "$f is not on the boot partition"
done
! grep -q '^start' "$work/boot-files.txt" || fail "Pi 4 firmware on a Pi 5 image"
mtype -i "$boot" ::/config.txt | tee "$work/config.txt"
mtype -i "$boot" ::/cmdline.txt | tee "$work/cmdline.txt"
grep -qx 'kernel=vmlinuz' "$work/config.txt" && grep -qx 'initramfs initrd.img followkernel' "$work/config.txt" \
  || fail "config.txt does not boot vmlinuz with initrd.img"
grep -q 'console=ttyAMA10,115200 .*root=LABEL=EDGEVLM_ROOT' "$work/cmdline.txt" || fail "cmdline.txt"
rm -rf "$work/boot" && mkdir -p "$work/boot"
mcopy -n -i "$boot" ::/vmlinuz ::/initrd.img ::/bcm2712-rpi-5-b.dtb ::/bcm2712d0-rpi-5-b.dtb "$work/boot/"
banner=$(strings "$work/boot/vmlinuz" | grep -m1 '^Linux version ' || true)
echo "kernel: $banner"
release=$(sed -n 's/^Linux version \([^ ]*\) .*/\1/p' <<<"$banner")
[ -n "$release" ] || fail "no Linux banner in vmlinuz"
for dtb in bcm2712-rpi-5-b bcm2712d0-rpi-5-b; do
  dtc -I dtb -O dts -q "$work/boot/$dtb.dtb" > "$work/$dtb.dts"
  for node in raspberrypi,rp1-gpio raspberrypi,rp1-gem snps,dwc3 brcm,bcm2712-sdhci; do
    grep 'compatible = ' "$work/$dtb.dts" | grep -qF "$node" || fail "$dtb.dtb has no $node node"
  done
  echo "$dtb.dtb: $(grep -m1 'model = ' "$work/$dtb.dts" | xargs); RP1 GPIO, RP1 Ethernet, USB (dwc3), SD card nodes present"
done

step "root partition"
root_img="$work/root.ext4"
start=$(sfdisk -J "$work/edgevlm-rpi5.img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["partitiontable"]["partitions"][1]["start"])')
dd if="$work/edgevlm-rpi5.img" of="$root_img" bs=512 skip="$start" status=none
dfs() { debugfs -R "$1" "$root_img" 2>/dev/null; }
dfs 'cat /etc/apt/preferences.d/edgevlm-kernel.pref' | grep -q 'Pin: release n=trixie-backports' || fail "no kernel pin"
dfs 'cat /var/lib/dpkg/diversions' | paste - - - | tee "$work/diversions.txt"
grep -q '^/usr/bin/linux-run-hooks' "$work/diversions.txt" && grep -q '^/etc/kernel/postinst.d/z50-raspi-firmware' "$work/diversions.txt" \
  || fail "the diversions are missing"
dfs 'cat /var/lib/dpkg/status' | awk '/^Package: linux-(image|modules|base)/ {p=$2} p && /^Version:/ {print p, $2; p=""}' | tee "$work/kernel-packages.txt"
mods=/usr/lib/modules/$release/kernel/drivers
for m in misc/rp1/rp1_pci clk/clk-rp1 pinctrl/pinctrl-rp1 net/ethernet/cadence/macb usb/dwc3/dwc3 \
  mmc/host/sdhci-brcmstb pinctrl/bcm/pinctrl-brcmstb-bcm2712; do
  dfs "stat $mods/$m.ko.xz" | grep -q 'Type: regular' || fail "no $m module in the image"
  echo "module $m.ko.xz"
done

if [ "$boot_vm" = 0 ]; then step "done (not booted)"; exit 0; fi

step "boot in qemu virt (cortex-a76)"
vm_boot cortex-a76 "$work/boot/vmlinuz" "$work/boot/initrd.img" "$work/edgevlm-rpi5.img"
vm_wait_ssh
echo "booted to ssh: $(( $(date +%s) - t0 )) s; first kernel line: $(grep -m1 'Linux version' "$work/console.log" | cut -c1-120)"
running=$(ssh_vm 'uname -r')
[ "$running" = "$release" ] || fail "the VM runs $running, not the image's $release"
ssh_vm 'set -e; uname -a; cat /etc/hostname; cat /etc/debian_version; findmnt -n -o SOURCE,SIZE /
  findmnt -n -o SOURCE /boot/firmware; sudo systemctl is-system-running || true
  sudo systemctl --failed --no-legend --plain | sed "s/^/failed unit: /"
  for m in pinctrl-rp1 rp1_pci clk-rp1 macb; do echo "module $m: $(/sbin/modinfo -F description $m)"; done'

step "kernel hook on the running system: update-initramfs -u"
texts='md5sum /boot/firmware/config.txt /boot/firmware/cmdline.txt'
before=$(ssh_vm "$texts")
ssh_vm 'sudo update-initramfs -u 2>&1 | tail -3'
[ "$(ssh_vm "$texts")" = "$before" ] || fail "the hook changed config.txt or cmdline.txt"
ssh_vm 'sudo cmp /boot/initrd.img-$(uname -r) /boot/firmware/initrd.img' \
  || fail "the hook did not copy the new initrd to /boot/firmware"
echo "initrd.img on the boot partition is the new initrd; config.txt and cmdline.txt unchanged"

step "done"
