#!/usr/bin/env bash
# Installs the Debian packages the local environment needs, and only those missing:
# PostgreSQL server, Redis server, protoc (etcd-client's build), openssl (test PKI),
# ca-certificates. Idempotent and quiet when everything is already there.
#
# The packages may start Debian's own services on 5432/6379; hack/env.sh never uses
# them (it starts its own servers on free loopback ports).
set -euo pipefail
log() { echo "install-deps: $*" >&2; }

missing=()
have_pg_server() { compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || command -v postgres >/dev/null; }
have_pg_server || missing+=(postgresql)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v openssl >/dev/null || missing+=(openssl)
[[ -s /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
command -v setpriv >/dev/null || missing+=(util-linux)

((${#missing[@]} == 0)) && exit 0

sudo=()
if ((EUID != 0)); then
  command -v sudo >/dev/null || { log "missing packages (${missing[*]}) and not root, no sudo: install them yourself"; exit 1; }
  sudo=(sudo -n)
fi
command -v apt-get >/dev/null || { log "missing: ${missing[*]}; apt-get not found (Debian/Ubuntu only): install them yourself"; exit 1; }

log "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
if ! { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } </dev/null >"$out" 2>&1; then
  tail -n 30 "$out" >&2
  log "apt-get failed"
  exit 1
fi
