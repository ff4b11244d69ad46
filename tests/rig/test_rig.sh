#!/usr/bin/env bash
# End-to-end test of rig/rig: two hosts (Debian 13 and 12), SSH, guest-to-guest traffic, apt, a reboot, the inventory,
# then teardown and a check that nothing is left. Root only; talks only to the 10.66.x hosts it makes.
set -euo pipefail
cd "$(dirname "$0")/../.."
RIG=rig/rig
A=rigtest-a B=rigtest-b
t0=$SECONDS
step() { printf '[%3ds] %s\n' $((SECONDS - t0)) "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
cleanup() { $RIG down "$A" >/dev/null 2>&1 || true; $RIG down "$B" >/dev/null 2>&1 || true; }
trap cleanup EXIT

step "prepare"; $RIG prepare trixie bookworm
step "up $A (trixie) and $B (bookworm)"; $RIG up "$A" 241 --suite trixie 2>/dev/null; $RIG up "$B" 242 --suite bookworm 2>/dev/null
step "again: up is idempotent"; $RIG up "$A" 241 2>/dev/null
! $RIG up "$A" 241 --suite bookworm 2>/dev/null || fail "a trixie host was accepted again as bookworm"
[ "$($RIG ssh "$A" cut -d. -f1 /etc/debian_version)" = 13 ] || fail "$A is not Debian 13"
[ "$($RIG ssh "$B" cut -d. -f1 /etc/debian_version)" = 12 ] || fail "$B is not Debian 12"
# Each guest's apt sources name its own release (deb822), never this machine's.
$RIG ssh "$A" grep -qx "'Suites: trixie trixie-updates'" /etc/apt/sources.list.d/debian.sources ||
  fail "$A's apt sources are not trixie's"
$RIG ssh "$A" '! grep -rqs bookworm /etc/apt/sources.list /etc/apt/sources.list.d/' || fail "$A has bookworm sources"
[ "$($RIG list | awk -v h="$B" '$1 == h {print $3}')" = bookworm ] || fail "rig list does not say $B's suite"
[ "$($RIG ssh "$A" systemd-detect-virt)" = systemd-nspawn ] || fail "not a systemd-nspawn guest"
[ "$($RIG ssh "$A" hostname)" = "$A" ] || fail "wrong hostname"
$RIG ssh "$A" ping -c1 -W2 "$($RIG ip "$B")" >/dev/null || fail "guests cannot reach each other"
step "apt inside a guest, while the other guest holds its apt archives lock"
# Two scenarios provisioning at once: each guest's package cache is its own, so is apt's lock on it.
$RIG ssh "$B" 'nohup python3 -c "import fcntl, time; f = open(\"/var/cache/apt/archives/lock\", \"w\");
fcntl.lockf(f, fcntl.LOCK_EX); open(\"/run/held\", \"w\"); time.sleep(120)" >/dev/null 2>&1 &'
for _ in $(seq 50); do $RIG ssh "$B" test -e /run/held && break; sleep 0.2; done
$RIG ssh "$B" test -e /run/held || fail "$B could not take its apt lock"
$RIG ssh "$A" 'DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null && jq --version' >/dev/null ||
  fail "apt install failed in the guest"
$RIG ssh "$B" 'pkill -f /run/held' || true
step "reboot round trip"
$RIG ssh "$A" 'systemctl reboot' || true
sleep 2
$RIG wait "$A" 120 2>/dev/null
[ "$($RIG ssh "$A" 'systemctl is-system-running')" = running ] || fail "not running after reboot"
$RIG ssh "$A" 'command -v jq' >/dev/null || fail "the guest lost its changes across a reboot"
step "inventory"
inventory="$($RIG inventory)"
grep -q "ansible_host: $($RIG ip "$B")" <<<"$inventory" || fail "inventory misses $B"
if [ -n "${ANSIBLE:-}" ]; then
  # Only this test's hosts: others on this machine (another suite's, a killed run's) are not ours to judge.
  out="$("$ANSIBLE" -i <(echo "$inventory") rig --limit "$A,$B" -m ansible.builtin.ping 2>&1)" ||
    { echo "$out" >&2; fail "ansible cannot reach the guests"; }
fi
step "teardown"
trap - EXIT
cleanup
left=0
[ -z "$(ip netns list | grep -E "^prig-rigtest" || true)" ] || { echo "netns left"; left=1; }
[ -z "$(ip -br link | grep -E '^p[rg]-rigtest' || true)" ] || { echo "veth left"; left=1; }
[ -z "$(findmnt -rn -o TARGET | grep -F "/hosts/rigtest" || true)" ] || { echo "mount left"; left=1; }
if [ -e "/var/lib/pilotys-rig/hosts/$A" ] || [ -e "/var/lib/pilotys-rig/hosts/$B" ]; then echo "state left"; left=1; fi
[ -z "$(pgrep -f "systemd-nspawn .* -M rigtest" || true)" ] || { echo "process left"; left=1; }
[ "$left" -eq 0 ] || fail "leftovers after teardown"
step "1 passed, 0 failed"
