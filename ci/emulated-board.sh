#!/usr/bin/env bash
# The whole system on an emulated ARM board, one command:
#   bash ci/emulated-board.sh [--keep-running] [--base ROOTFS.tar]
#
# 1. cross-builds edgevlm for aarch64 (ci/cross.sh) and the host CLI;
# 2. `edgevlm image build --board rpi4 --model models/demo` (mmdebstrap rootfs, cached in
#    target/emulated-board/cache after the first run);
# 3. boots that image's kernel, initrd and root filesystem in
#    `qemu-system-aarch64 -M virt -cpu cortex-a72` (user-mode network, ssh forwarded to
#    127.0.0.1, console log in target/emulated-board/console.log), on a 4 GiB overlay so the
#    first-boot unit grows the root partition;
# 4. from the host: `edgevlm models`, `edgevlm push` of a new version, `edgevlm bench`, all over
#    ssh with host-key checking; the same over a serial line (a virtconsole in the VM, where
#    the image runs `edgevlm agent --serial /dev/hvc0`, and a pty on the host); inside the VM:
#    `modprobe vivid` and the board layer's real-device tests (cross-built) against it.
# Not covered: gpio-sim (Debian's arm64 kernel lacks it).
# Exit 0 when every step passed; timings are printed per step.
set -euo pipefail
cd "$(dirname "$0")/.."

keep=0
base_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --keep-running) keep=1; shift ;;
    --base) base_args=(--base "${2:?--base needs a tarball}"); shift 2 ;;
    *) echo "emulated-board.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
work=target/emulated-board
mkdir -p "$work"
t0=$(date +%s)
step() { echo; echo "=== emulated board: $* (+$(( $(date +%s) - t0 )) s)"; }
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
export CARGO_TERM_COLOR=never

step "packages"
. ci/apt.sh
# bookworm's qemu-system-arm 7.2 conflicts with the newer qemu-utils; backports has 10.x.
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/backports.list >/dev/null
fi
apt_install -t bookworm-backports qemu-system-arm
apt_install mmdebstrap qemu-user-static binfmt-support dosfstools mtools e2fsprogs fdisk openssh-client qemu-utils
# mmdebstrap runs arm64 maintainer scripts through binfmt_misc.
[ -e /proc/sys/fs/binfmt_misc/register ] || $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
$SUDO update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true

step "builds"
bash ci/cross.sh --no-test
cargo build --release -j2 -q -p edgevlm
edgevlm=target/release/edgevlm
# The board layer's real-device tests, for aarch64, to run inside the VM (zig and the header
# path as ci/cross.sh set them up).
export PATH="$PWD/target/cross-venv/bin:$PATH"
export BINDGEN_EXTRA_CLANG_ARGS="-idirafter /usr/aarch64-linux-gnu/include"
cargo-zigbuild test --release -j2 -q -p edgevlm-board-linux --test devices \
  --target aarch64-unknown-linux-gnu.2.28 --no-run
devices_test=$(ls -t target/aarch64-unknown-linux-gnu/release/deps/devices-* | grep -v '\.d$' | head -1)

step "image"
[ -f "$work/id_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -C emulated-board -f "$work/id_ed25519"
$SUDO "$edgevlm" image build --board rpi4 --model models/demo --ssh-key "$work/id_ed25519.pub" \
  --hostname emu-board --serial-agent hvc0:115200 --cache "$work/cache" "${base_args[@]}" \
  --out "$work/edgevlm-rpi4.img"

step "boot"
boot="$work/edgevlm-rpi4.img@@4194304"
rm -f "$work/vmlinuz" "$work/initrd.img"
mcopy -i "$boot" ::/vmlinuz ::/initrd.img "$work/"
rm -f "$work/disk.qcow2" "$work/agent.pty"
qemu-img create -q -f qcow2 -F raw -b "$(realpath "$work/edgevlm-rpi4.img")" "$work/disk.qcow2" 4G
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
: > "$work/console.log"
qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 2 -m 2048 \
  -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
  -append "root=LABEL=EDGEVLM_ROOT rootfstype=ext4 rootwait console=ttyAMA0" \
  -drive "file=$work/disk.qcow2,if=virtio,format=qcow2" \
  -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=net0,romfile= \
  -device virtio-serial-pci,romfile= -chardev "pty,id=agentline,path=$work/agent.pty" -device virtconsole,chardev=agentline \
  -display none -monitor none -serial "file:$work/console.log" 2> "$work/qemu.log" &
qemu=$!
cleanup() {
  if [ "$keep" = 0 ]; then kill "$qemu" 2>/dev/null || true; wait "$qemu" 2>/dev/null || true; fi
}
trap cleanup EXIT

# Host keys are made at first boot; record them once sshd answers (the harness trusts the
# key it sees on its own loopback, then checks it on every later connection).
known="$work/known_hosts"
: > "$known"
for _ in $(seq 1 180); do
  if ! kill -0 "$qemu" 2>/dev/null; then echo "qemu exited; console:"; tail -40 "$work/console.log"; exit 1; fi
  if ssh-keyscan -T 3 -p "$port" 127.0.0.1 2>/dev/null | grep -v '^#' > "$known.new" && [ -s "$known.new" ]; then
    mv "$known.new" "$known"; break
  fi
  sleep 5
done
[ -s "$known" ] || { echo "no ssh after 15 minutes; console:"; tail -40 "$work/console.log"; exit 1; }
ssh_vm() {
  ssh -F none -p "$port" -i "$work/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="$known" -o GlobalKnownHostsFile=/dev/null -o IdentitiesOnly=yes \
    edgevlm@127.0.0.1 "$@"
}
for _ in $(seq 1 60); do ssh_vm true 2>/dev/null && break; sleep 2; done
ssh_vm 'uname -a; cat /etc/hostname; findmnt -n -o SOURCE,SIZE /; systemctl is-system-running || true'

step "host tool over ssh"
export EDGEVLM_HOME="$PWD/$work/home"
mkdir -p "$EDGEVLM_HOME"
cat > "$EDGEVLM_HOME/boards.toml" <<EOF
[[board]]
name = "emu"
url = "ssh://edgevlm@127.0.0.1:$port"
tags = ["qemu", "cortex-a72"]
identity = "$PWD/$work/id_ed25519"
known_hosts = "$PWD/$known"
EOF
export EDGEVLM_BOARDS="$EDGEVLM_HOME/boards.toml"
"$edgevlm" models --board emu | tee "$work/models.txt"
grep -q "demo-parts" "$work/models.txt"
rm -rf "$work/demo-v2"; cp -r models/demo "$work/demo-v2"
sed -i 's/^version = "1.0.0"/version = "1.0.1"/' "$work/demo-v2/model.toml"
"$edgevlm" push --board emu "$work/demo-v2" --activate
"$edgevlm" models --board emu
"$edgevlm" bench --board emu --model "$work/demo-v2" --warmup 2 --iterations 20 \
  --db "$work/results.sqlite"
"$edgevlm" compare --last 1 --db "$work/results.sqlite"

step "host tool over the serial line (virtconsole hvc0 <-> host pty)"
pty=$(readlink -f "$work/agent.pty" || true)
[ -c "$pty" ] || { echo "qemu made no pty for the agent line:"; cat "$work/qemu.log"; exit 1; }
serial="serial://$pty?baud=115200"
"$edgevlm" models --board "$serial"
rm -rf "$work/demo-v3"; cp -r models/demo "$work/demo-v3"
sed -i 's/^version = "1.0.0"/version = "1.0.2"/' "$work/demo-v3/model.toml"
"$edgevlm" push --board "$serial" "$work/demo-v3" --activate
"$edgevlm" models --board emu | tee "$work/models.txt"
grep -q "1.0.2.*active" "$work/models.txt"

step "real devices inside the VM (vivid)"
scp -F none -P "$port" -i "$work/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=yes \
  -o UserKnownHostsFile="$known" -o IdentitiesOnly=yes -q "$devices_test" edgevlm@127.0.0.1:/tmp/devices
ssh_vm 'sudo modprobe vivid && ls -l /dev/video* && sudo /tmp/devices --test-threads 1 --nocapture'

step "done"
if [ "$keep" = 1 ]; then
  echo "VM still running (pid $qemu): ssh -p $port -i $work/id_ed25519 edgevlm@127.0.0.1"
  trap - EXIT
fi
