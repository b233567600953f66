# Sourced by the ci/ scripts. `apt_install [-t RELEASE] PKG...` installs the packages that are
# not installed yet (one `apt-get update` first), as root or through sudo; with -t, from that
# release (e.g. bookworm-backports) and without recommends.
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
apt_install() {
  local from=()
  if [ "${1:-}" = -t ]; then from=(--no-install-recommends -t "$2"); shift 2; fi
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${from[@]}" "${missing[@]}"
}
