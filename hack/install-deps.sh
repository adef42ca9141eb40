#!/usr/bin/env bash
# Installs the Debian packages the build and the local environment need, and only those
# missing. It checks for the files and programs that are really used (not merely for a
# command: protoc without its include files fails etcd-client's build), installs the
# packages that provide them, checks again, and fails with one line naming what is still
# missing. Idempotent and quiet when everything is there.
#
# The packages may start Debian's own services on 5432/6379/80; hack/env.sh never uses
# them (it starts its own servers on free loopback ports).
set -euo pipefail
log() { echo "install-deps: $*" >&2; }

# requirement: "what is checked" -> the Debian package that provides it.
# A check is an absolute path (a file that must exist), a glob (one match is enough), or a
# command name looked up on PATH.
requirements=(
  "protoc protobuf-compiler"                                 # etcd-client's build script
  "/usr/include/google/protobuf/descriptor.proto libprotobuf-dev" # its well-known imports
  "/usr/lib/postgresql/*/bin/postgres postgresql"            # hack/env.sh: the server
  "/usr/lib/postgresql/*/bin/initdb postgresql"
  "redis-server redis-server"
  "redis-cli redis-tools"
  "openssl openssl"                                          # the test PKI
  "/etc/ssl/certs/ca-certificates.crt ca-certificates"
  "setpriv util-linux"                                       # postgres refuses to run as root
  "nginx nginx-light"                                        # the gateway's end-to-end test and the demo
  "curl curl"                                                # the demo's calls through nginx
  "/bin/kill procps"                                         # tests signal operators (SIGSTOP, SIGTERM)
  "curl curl"                                                # hack/env.sh M3O_TLS=1: etcd auth set-up
  "umoci umoci"                                              # make image: the OCI layout
  "jq jq"                                                    # make image, check-dockerfile: JSON
  "strip binutils"                                           # make image: stripped binaries
  "runc runc"                                                # the image test runs the image
)

present() {
  local what="$1"
  case "$what" in
    /*) compgen -G "$what" >/dev/null ;;
    *) command -v "$what" >/dev/null || [[ -x "/usr/sbin/$what" ]] ;;
  esac
}

missing_packages() {
  local req what pkg
  local -A seen=()
  for req in "${requirements[@]}"; do
    read -r what pkg <<<"$req"
    present "$what" || seen[$pkg]=1
  done
  printf '%s\n' "${!seen[@]}" | sort
}

missing_things() {
  local req what pkg
  for req in "${requirements[@]}"; do
    read -r what pkg <<<"$req"
    present "$what" || printf '%s (%s) ' "$what" "$pkg"
  done
}

mapfile -t missing < <(missing_packages | sed '/^$/d')
((${#missing[@]} == 0)) && exit 0

sudo=()
if ((EUID != 0)); then
  command -v sudo >/dev/null || { log "missing: $(missing_things)and not root, no sudo: install them yourself"; exit 1; }
  sudo=(sudo -n)
fi
command -v apt-get >/dev/null || { log "missing: $(missing_things); apt-get not found (Debian/Ubuntu only): install them yourself"; exit 1; }

log "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
# policy-rc.d 101: packages must not start their own services (nginx would take port 80).
policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e $policy ]] && ((EUID == 0)); then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
  trap 'rm -f "$out"; ((own_policy)) && rm -f "$policy"' EXIT
fi
if ! { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } </dev/null >"$out" 2>&1; then
  tail -n 30 "$out" >&2
  log "apt-get install ${missing[*]} failed"
  exit 1
fi

still="$(missing_things)"
[[ -z "$still" ]] || { log "still missing after installing ${missing[*]}: $still"; exit 1; }
