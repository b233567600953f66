# Sourced by ci/emulated-board.sh and ci/rpi5-image.sh (after `cd` to the repository root): the
# plumbing both need to build an edgevlm image and boot it in `qemu-system-aarch64 -M virt`.
#   vm_init LABEL WORKDIR "$@"   parses --base ROOTFS.tar into base_args and hands every other
#                                argument to the script's own `script_flag ARG` (define it first;
#                                it fails for an argument it does not know); makes WORKDIR ($work),
#                                starts the clock for `step`, loads cargo's environment
#   step TEXT / fail TEXT        a timed step heading / an error naming the script, exit 1
#   vm_packages [PKG...]         qemu-system-arm (bookworm-backports), the image builder's tools
#                                and arm64 binfmt, plus PKG
#   vm_ssh_key                   $work/id_ed25519, made once
#   vm_boot CPU KERNEL INITRD IMAGE [QEMU_ARG...]
#                                boots KERNEL and INITRD with IMAGE as a 4 GiB qcow2 overlay
#                                ($work/disk.qcow2), ssh forwarded from 127.0.0.1:$port, the
#                                console in $work/console.log, qemu's stderr in $work/qemu.log;
#                                QEMU_ARG are the script's extra devices. $qemu is its pid; it is
#                                killed on exit unless vm_keep=1
#   vm_wait_ssh                  waits until the VM accepts `ssh_vm`, host key in $known
#   ssh_vm CMD... / scp_vm ARG...  edgevlm@ the VM with $work/id_ed25519, host key checked
# shellcheck shell=bash
. ci/apt.sh

vm_keep=0
vm_script=$(basename "$0")

vm_init() {
  vm_label=$1 work=$2
  shift 2
  base_args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --base) base_args=(--base "${2:?--base needs a tarball}"); shift 2 ;;
      *) script_flag "$1" || { echo "$vm_script: unknown argument $1" >&2; exit 2; }; shift ;;
    esac
  done
  mkdir -p "$work"
  t0=$(date +%s)
  if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
  export CARGO_TERM_COLOR=never
}

step() { echo; echo "=== $vm_label: $* (+$(( $(date +%s) - t0 )) s)"; }
fail() { echo "$vm_script: $*" >&2; exit 1; }

vm_packages() {
  # bookworm's qemu-system-arm 7.2 conflicts with the newer qemu-utils; backports has 10.x.
  if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/backports.list >/dev/null
  fi
  apt_install -t bookworm-backports qemu-system-arm
  apt_install mmdebstrap qemu-user-static binfmt-support dosfstools mtools e2fsprogs fdisk \
    openssh-client qemu-utils "$@"
  # mmdebstrap runs arm64 maintainer scripts through binfmt_misc.
  [ -e /proc/sys/fs/binfmt_misc/register ] || $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  $SUDO update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
}

vm_ssh_key() {
  [ -f "$work/id_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -C "${vm_script%.sh}" -f "$work/id_ed25519"
}

vm_boot() {
  local cpu=$1 kernel=$2 initrd=$3 image=$4
  shift 4
  rm -f "$work/disk.qcow2"
  qemu-img create -q -f qcow2 -F raw -b "$(realpath "$image")" "$work/disk.qcow2" 4G
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  : > "$work/console.log"
  qemu-system-aarch64 -M virt -cpu "$cpu" -smp 2 -m 2048 \
    -kernel "$kernel" -initrd "$initrd" \
    -append "root=LABEL=EDGEVLM_ROOT rootfstype=ext4 rootwait console=ttyAMA0" \
    -drive "file=$work/disk.qcow2,if=virtio,format=qcow2" \
    -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=net0,romfile= \
    "$@" -display none -monitor none -serial "file:$work/console.log" 2> "$work/qemu.log" &
  qemu=$!
  trap vm_cleanup EXIT
}

vm_cleanup() {
  if [ "$vm_keep" = 0 ]; then kill "$qemu" 2>/dev/null || true; wait "$qemu" 2>/dev/null || true; fi
}

# Host keys are made at first boot; record them once sshd answers (the harness trusts the key
# it sees on its own loopback, then checks it on every later connection).
vm_wait_ssh() {
  known="$work/known_hosts"
  : > "$known"
  for _ in $(seq 1 180); do
    kill -0 "$qemu" 2>/dev/null || { tail -40 "$work/console.log"; fail "qemu exited (console above)"; }
    if ssh-keyscan -T 3 -p "$port" 127.0.0.1 2>/dev/null | grep -v '^#' > "$known.new" && [ -s "$known.new" ]; then
      mv "$known.new" "$known"; break
    fi
    sleep 5
  done
  [ -s "$known" ] || { tail -40 "$work/console.log"; fail "no ssh after 15 minutes (console above)"; }
  for _ in $(seq 1 60); do ssh_vm true 2>/dev/null && break; sleep 2; done
}

ssh_vm() {
  ssh -F none -p "$port" -i "$work/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="$known" -o GlobalKnownHostsFile=/dev/null -o IdentitiesOnly=yes \
    edgevlm@127.0.0.1 "$@"
}
scp_vm() {
  scp -F none -P "$port" -i "$work/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="$known" -o GlobalKnownHostsFile=/dev/null -o IdentitiesOnly=yes -q "$@"
}
