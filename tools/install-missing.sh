# Sourced by the tools that install what they need (tools/test.sh, tools/fuzz.sh,
# tools/compare-rsync.sh): `install_missing COMMAND:PACKAGE...` installs with apt-get (Debian)
# the package of each command not on the PATH, through sudo unless root, saying which. Debian
# starts etcd as a service when it installs etcd-server; the tests and tools run their own, so
# that one is stopped and disabled.
install_missing() {
  local missing=() pair sudo=""
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  case " ${missing[*]} " in
    *" etcd-server "*) $sudo systemctl disable --now etcd >/dev/null 2>&1 || true ;;
  esac
}
