#!/usr/bin/env bash
# The whole system on an emulated ARM board, one command:
#   bash ci/emulated-board.sh [--keep-running] [--base ROOTFS.tar]
#
# 1. cross-builds edgevlm for aarch64 (ci/cross.sh) and the host CLI;
# 2. `edgevlm image build --board rpi4 --model models/demo` (mmdebstrap rootfs, cached in
#    target/emulated-board/cache after the first run);
# 3. cross-builds gpio-sim as a module for exactly that image's kernel (ci/gpio-sim-module.sh;
#    Debian's arm64 kernel lacks it), then boots the image's kernel, initrd and root
#    filesystem in `qemu-system-aarch64 -M virt -cpu cortex-a72` (user-mode network, ssh
#    forwarded to 127.0.0.1, console log in target/emulated-board/console.log), on a 4 GiB
#    overlay so the first-boot unit grows the root partition;
# 4. from the host: `edgevlm models`, `edgevlm push` of a new version, `edgevlm bench`, all over
#    ssh with host-key checking; the same over a serial line (a virtconsole in the VM, where
#    the image runs `edgevlm agent --serial /dev/hvc0`, and a pty on the host);
# 5. inside the VM: `modprobe vivid`, `insmod gpio-sim.ko` and a gpio-sim chip made through
#    configfs, and the board layer's real-device tests (cross-built) against them, where a
#    skipped test fails;
# 6. the integrator path: the image's edgevlm-agent.service with a profile whose trigger input
#    and OK / NG / ERROR / BUSY outputs are gpio-sim lines and whose camera is vivid. From the
#    host, over ssh, 5 triggers through gpio-sim's `pull` attribute: each gives exactly one
#    OK or NG verdict in the journal and one pulse on its line (sampled from sysfs `value`).
#    Then a storm of 10 triggers faster than a part is judged: drops are counted and logged,
#    triggers = judged + dropped, the agent keeps its pid and judges the next trigger.
# Exit 0 when every step passed; timings are printed per step. Logs of the last run in
# target/emulated-board/: agent.log (the agent's journal), pins-*.log (output line changes).
set -euo pipefail
cd "$(dirname "$0")/.."

. ci/vm.sh
script_flag() { case "$1" in --keep-running) vm_keep=1 ;; *) return 1 ;; esac; }
vm_init "emulated board" target/emulated-board "$@"

step "packages"
vm_packages

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
vm_ssh_key
$SUDO "$edgevlm" image build --board rpi4 --model models/demo --ssh-key "$work/id_ed25519.pub" \
  --hostname emu-board --serial-agent hvc0:115200 --cache "$work/cache" "${base_args[@]}" \
  --out "$work/edgevlm-rpi4.img"

step "boot"
boot="$work/edgevlm-rpi4.img@@4194304"
rm -f "$work/vmlinuz" "$work/initrd.img"
mcopy -i "$boot" ::/vmlinuz ::/initrd.img "$work/"
# gpio-sim for exactly this kernel (Debian's arm64 config leaves it out), before qemu takes
# the two cores.
bash ci/gpio-sim-module.sh "$work/vmlinuz" "$work/gpio-sim"
rm -f "$work/agent.pty"
# The agent's serial line: a virtconsole (hvc0 in the VM) on a pty on the host.
vm_boot cortex-a72 "$work/vmlinuz" "$work/initrd.img" "$work/edgevlm-rpi4.img" \
  -device virtio-serial-pci,romfile= -chardev "pty,id=agentline,path=$work/agent.pty" -device virtconsole,chardev=agentline
vm_wait_ssh
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

step "real devices inside the VM (vivid, gpio-sim)"
scp_vm "$devices_test" edgevlm@127.0.0.1:/tmp/devices
scp_vm "$work/gpio-sim/gpio-sim.ko" edgevlm@127.0.0.1:/tmp/gpio-sim.ko
# The chip layout boards/linux/tests/devices.rs documents: one bank of 8 lines. The module
# is unsigned (the kernel notes a taint) and needs configfs.
ssh_vm 'set -e
  sudo modprobe vivid
  sudo modprobe configfs
  mountpoint -q /sys/kernel/config || sudo mount -t configfs none /sys/kernel/config
  sudo insmod /tmp/gpio-sim.ko
  c=/sys/kernel/config/gpio-sim/edgevlm
  sudo mkdir -p $c/gpio-bank0
  echo 8 | sudo tee $c/gpio-bank0/num_lines >/dev/null
  echo 1 | sudo tee $c/live >/dev/null
  echo "gpio-sim: $(cat $c/gpio-bank0/chip_name) on $(cat $c/dev_name); $(sudo dmesg | grep gpio_sim | tail -1)"
  ls -l /dev/video* /dev/gpiochip*
  # Every device is there now: a skip would be a failure.
  sudo env EDGEVLM_REQUIRE_DEVICES=1 /tmp/devices --test-threads 1 --nocapture'

step "integrator path inside the VM: gpio-sim trigger -> vivid frame -> verdict pins (edgevlm-agent.service)"
# The image's unit and config, pointed at a profile for this machine: gpio-sim line 0 is the
# part-present input, lines 1-4 are OK / NG / ERROR / BUSY, vivid is the camera. 200 ms pulses
# (slow enough for a shell to sample), a queue of 2 so a trigger storm overflows it.
ssh_vm 'bash -s' <<'EOF'
set -euo pipefail
chip=$(cat /sys/kernel/config/gpio-sim/edgevlm/gpio-bank0/chip_name)
video=$(grep -lx vivid-000-vid-cap /sys/class/video4linux/video*/name | cut -d/ -f5)
sudo tee /etc/edgevlm/emulated-board.toml >/dev/null <<PROFILE
name = "emulated-board"
description = "qemu virt: gpio-sim lines as the I/O board, vivid as the camera"
memory_budget_mb = 1024

[gpio]
chip = "$chip"

[gpio.trigger]
line = 0
edge = "rising"

[gpio.outputs]
ok = 1
ng = 2
error = 3
busy = 4

[camera]
device = "/dev/$video"
width = 640
height = 480
format = "YUYV"
PROFILE
sudo sed -i -e 's|^profile = .*|profile = "/etc/edgevlm/emulated-board.toml"|' \
  -e 's|^pulse_ms = .*|pulse_ms = 200|' -e 's|^capacity = .*|capacity = 2|' /etc/edgevlm/agent.toml
# Samples the output lines every 5 ms without forking (the read of an empty pipe is the
# sleep), one line per change: "<time> <ok><ng><error><busy>".
cat > /tmp/pins.sh <<'SAMPLER'
cd "$1"; prev=
exec 9<> <(:)
while [ ! -e /tmp/pins.stop ]; do
  read -r -t 0.005 -u 9 || true
  read -r ok < sim_gpio1/value; read -r ng < sim_gpio2/value
  read -r error < sim_gpio3/value; read -r busy < sim_gpio4/value
  now="$ok$ng$error$busy"
  [ "$now" = "$prev" ] || { echo "$EPOCHREALTIME $now" >> /tmp/pins.log; prev=$now; }
done
SAMPLER
# Restarted so it starts from the new config (it failed at boot: no Pi GPIO chip here).
sudo systemctl reset-failed edgevlm-agent
sudo systemctl restart edgevlm-agent
sudo systemctl is-active edgevlm-agent
EOF
sim_dir=$(ssh_vm 'd=/sys/bus/gpio/devices/$(cat /sys/kernel/config/gpio-sim/edgevlm/gpio-bank0/chip_name); [ -d $d/sim_gpio0 ] || d=$d/..; readlink -f $d')
pull="$sim_dir/sim_gpio0/pull"
agent_log() {
  ssh_vm 'sudo journalctl -u edgevlm-agent -o cat --no-pager _SYSTEMD_INVOCATION_ID=$(sudo systemctl show -p InvocationID --value edgevlm-agent)'
}
# Rising edges per output line in the sampler's log: "ok ng error busy".
pulses() { awk '{ for (i = 1; i <= 4; i++) { c = substr($2, i, 1); if (c == 1 && p[i] != 1) n[i]++; p[i] = c } }
  END { printf "%d %d %d %d\n", n[1], n[2], n[3], n[4] }'; }
start_sampler() { ssh_vm "sudo rm -f /tmp/pins.stop /tmp/pins.log; sudo setsid -f bash /tmp/pins.sh $sim_dir </dev/null >/dev/null 2>&1"; }
stop_sampler() { ssh_vm 'sudo touch /tmp/pins.stop; sleep 0.5; cat /tmp/pins.log' > "$1"; }
# Waits until the agent has logged `n` parts (and, with a second argument, that many parts
# plus drops); prints the log.
wait_parts() {
  local n=$1 handled=${2:-} log
  for _ in $(seq 1 60); do
    log=$(agent_log)
    local parts; parts=$(grep -c '^event=part ' <<<"$log" || true)
    local dropped; dropped=$(grep -o '^event=dropped .*total=[0-9]*' <<<"$log" | tail -1 | sed 's/.*total=//' || true)
    if [ -n "$handled" ]; then
      [ $((parts + ${dropped:-0})) -ge "$handled" ] && { echo "$log"; return 0; }
    elif [ "$parts" -ge "$n" ]; then echo "$log"; return 0; fi
    sleep 1
  done
  echo "$log"; echo "the agent logged no part $n in 60 s" >&2; return 1
}

# 1. One trigger at a time, each from the host over ssh: exactly one verdict per trigger, a
#    fresh frame for each (a stale one would be an ERROR), one pulse on its output line.
ts=$(date +%s)
start_sampler
for i in 1 2 3 4 5; do
  ssh_vm "echo pull-up | sudo tee $pull >/dev/null; sleep 0.05; echo pull-down | sudo tee $pull >/dev/null"
  wait_parts "$i" > "$work/agent.log"
  sleep 0.4
done
stop_sampler "$work/pins-single.log"
grep '^event=part ' "$work/agent.log"
read -r p_ok p_ng p_error p_busy < <(pulses < "$work/pins-single.log")
n_ok=$(grep -c '^event=part .*verdict=OK' "$work/agent.log" || true)
n_ng=$(grep -c '^event=part .*verdict=NG' "$work/agent.log" || true)
echo "single triggers: 5 sent, verdicts OK $n_ok NG $n_ng; pulses OK $p_ok NG $p_ng ERROR $p_error BUSY $p_busy"
[ "$(grep -c '^event=part ' "$work/agent.log")" = 5 ] && [ $((n_ok + n_ng)) = 5 ] \
  && [ "$(grep -o '^event=part seq=[0-9]*' "$work/agent.log" | sed 's/.*=//' | paste -sd' ')" = "0 1 2 3 4" ] \
  && [ "$p_ok" = "$n_ok" ] && [ "$p_ng" = "$n_ng" ] && [ "$p_error" = 0 ] && [ "$p_busy" = 5 ] \
  || { echo "expected 5 parts (seq 0-4), each OK or NG with one pulse on its line and one on BUSY"; cat "$work/pins-single.log"; exit 1; }
echo "single triggers: $(( $(date +%s) - ts )) s"

# 2. A storm: 10 pulses 40 ms apart (inside the VM; ssh is slower than that) while a part
#    takes longer. The queue (2) fills, the rest is dropped and reported; the agent stays up
#    and judges the next trigger, whose sequence number counts the dropped ones.
ts=$(date +%s)
pid=$(ssh_vm 'sudo systemctl show -p MainPID --value edgevlm-agent')
start_sampler
ssh_vm "sudo bash -c 'exec 9<> <(:); for i in \$(seq 10); do echo pull-up > $pull; read -t 0.02 -u 9; echo pull-down > $pull; read -t 0.02 -u 9; done; true'"
wait_parts 0 15 > "$work/agent.log"
sleep 1
ssh_vm "echo pull-up | sudo tee $pull >/dev/null; sleep 0.05; echo pull-down | sudo tee $pull >/dev/null"
wait_parts 0 16 > "$work/agent.log"
[ "$(ssh_vm 'sudo systemctl is-active edgevlm-agent; sudo systemctl show -p MainPID --value -p NRestarts edgevlm-agent' | tr '\n' ' ')" = "active $pid 0 " ] \
  || { echo "the agent did not survive the storm"; agent_log; exit 1; }
# Stopping plays out the pulses still queued (one pulse_ms + gap_ms each), so the pins are
# sampled until the agent has exited.
ssh_vm 'sudo systemctl stop edgevlm-agent'
sleep 0.5
stop_sampler "$work/pins-storm.log"
agent_log > "$work/agent.log"
grep -v '^event=part seq=[0-4] ' "$work/agent.log"
summary=$(grep '^event=summary ' "$work/agent.log")
triggers=$(sed 's/.* triggers=\([0-9]*\).*/\1/' <<<"$summary")
judged=$(sed 's/.* judged=\([0-9]*\).*/\1/' <<<"$summary")
dropped=$(sed 's/.* dropped=\([0-9]*\).*/\1/' <<<"$summary")
logged_drops=$(grep -o '^event=dropped new=[0-9]*' "$work/agent.log" | sed 's/.*=//' | awk '{ s += $1 } END { print s + 0 }')
read -r p_ok p_ng p_error p_busy < <(pulses < "$work/pins-storm.log")
echo "storm: 11 triggers sent, $((judged - 5)) judged, $dropped dropped ($logged_drops in event=dropped lines); pulses OK $p_ok NG $p_ng ERROR $p_error BUSY $p_busy"
[ "$triggers" = 16 ] && [ $((judged + dropped)) = 16 ] && [ "$dropped" -ge 1 ] \
  && [ "$logged_drops" = "$dropped" ] && [ "$(grep -c '^event=part ' "$work/agent.log")" = "$judged" ] \
  && grep -q '^event=part seq=15 verdict=\(OK\|NG\) ' "$work/agent.log" \
  || { echo "expected 16 triggers = judged + dropped, every drop logged, the last trigger (seq 15) judged"; exit 1; }
# Every verdict is its own pulse on its line, even back to back (a PLC counts pulses): the
# board layer queues them with gap_ms of low time between two pulses on one pin.
[ $((p_ok + p_ng + p_error)) = $((judged - 5)) ] \
  || { echo "expected $((judged - 5)) verdict pulses in the storm, saw $((p_ok + p_ng + p_error))"; exit 1; }
echo "storm: $(( $(date +%s) - ts )) s"

step "done"
if [ "$vm_keep" = 1 ]; then
  echo "VM still running (pid $qemu): ssh -p $port -i $work/id_ed25519 edgevlm@127.0.0.1"
fi
