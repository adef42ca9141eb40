#!/usr/bin/env bash
# The local environment of `make test` (README), on loopback, in a fresh temporary dir:
# kube-apiserver + etcd (control plane, no kubelet/controller-manager), PostgreSQL,
# Redis and a second etcd for platform config. Every server listens on a free port.
#
#   hack/env.sh run -- CMD...   bring up, run CMD with the exports below, tear down;
#                               exits with CMD's status
#   hack/env.sh up              bring up and stay in the foreground until Ctrl-C
#
# Exports (also written to $M3O_ENV_DIR/env): KUBECONFIG DATABASE_URL REDIS_URL
# ETCD_ENDPOINTS M3O_ENV_DIR M3O_TEST_ENV=1 KUBECACHEDIR, PATH prefixed with the
# kubectl/helm dir.
# Server logs: $M3O_ENV_DIR/logs/<name>.log. M3O_KEEP_ENV=1 keeps the dir afterwards.
# M3O_TOOLS_BIN=<dir with kube-apiserver, etcd, kubectl> skips hack/build-tools.sh.
# M3O_CRD_DIR overrides charts/m3o-operator/crds (CRDs applied after bring-up).
# M3O_TLS=1: PostgreSQL, Redis and the platform etcd accept only TLS (certificates from
# the test PKI, client certificates checked by etcd) and the operator's least-privilege
# users (README: Secure connections); the exports then carry them (DATABASE_URL,
# REDIS_URL, ETCD_ENDPOINTS and the M3O_REDIS_*/M3O_ETCD_* fallbacks of the TLS and
# credential flags). For running the operator by hand: the test suite starts its own
# TLS servers (operator/tests/integration/tls.rs) and needs the default, plain.
# The gateway's own identity (README: Secure connections) is in $M3O_ENV_DIR/gateway.env:
# its REDIS_URL (ACL user m3o-gateway: limiter keys and script only), client
# certificate and etcd user m3o-gateway (reads <prefix>/, writes <prefix>/gateways/).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source-path=SCRIPTDIR
source "$here/lib.sh"

log() { echo "env: $*" >&2; }
usage() {
  sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

mode="${1:-}"
case "$mode" in
  run)
    shift
    [[ "${1:-}" == "--" ]] && shift
    (($# > 0)) || usage
    ;;
  up) shift; (($# == 0)) || usage ;;
  -h | --help | help | *) usage ;;
esac

# ---------------------------------------------------------------------------------------
# Process bookkeeping and teardown.
names=() pids=() stop_sigs=()
declare -A pid_of=()
dir="" pg_init_pid=""
start_ms="$(now_ms)"

# track NAME PID SIGNAL: remember a server to stop (with SIGNAL) on exit.
track() { names+=("$1"); pids+=("$2"); stop_sigs+=("$3"); pid_of[$1]="$2"; }

# stop_all PID...: signal each (with its stop signal), wait up to 15s, then SIGKILL.
# shellcheck disable=SC2317 # invoked by the EXIT trap
stop_all() {
  local i pid deadline alive
  for pid in "$@"; do
    for i in "${!pids[@]}"; do [[ "${pids[i]}" == "$pid" ]] && kill "-${stop_sigs[i]}" "$pid" 2>/dev/null; done
  done
  deadline=$((SECONDS + 15))
  while :; do
    alive=()
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    ((${#alive[@]} == 0)) && break
    if ((SECONDS >= deadline)); then
      log "killing unresponsive processes: ${alive[*]}"
      kill -KILL "${alive[@]}" 2>/dev/null
      break
    fi
    sleep 0.05
  done
  for pid in "$@"; do wait "$pid" 2>/dev/null; done
}

# shellcheck disable=SC2317 # invoked by the EXIT trap
teardown() {
  local rc=$? rest=() i
  trap '' INT TERM HUP
  trap - EXIT
  set +e
  # The apiserver first, while its etcd still answers; then all the rest together.
  [[ -n "${pid_of[kube-apiserver]:-}" ]] && stop_all "${pid_of[kube-apiserver]}"
  for i in "${!pids[@]}"; do [[ "${names[i]}" != kube-apiserver ]] && rest+=("${pids[i]}"); done
  ((${#rest[@]} > 0)) && stop_all "${rest[@]}"
  # initdb is short-lived and must not write into a removed dir: let it finish.
  [[ -n "$pg_init_pid" ]] && wait "$pg_init_pid" 2>/dev/null
  if [[ -n "$dir" && -d "$dir" ]]; then
    if [[ "${M3O_KEEP_ENV:-}" == 1 ]]; then
      log "kept $dir (M3O_KEEP_ENV=1)"
    else
      rm -rf "$dir"
    fi
  fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# fail COMPONENT [LOG]: report a start-up failure with the tail of the log, then exit
# (the EXIT trap tears everything down).
fail() {
  log "$1 failed to start"
  if [[ -n "${2:-}" && -s "$2" ]]; then
    log "last lines of $2:"
    tail -n 40 "$2" | sed 's/^/    /' >&2
  fi
  exit 1
}

# wait_for NAME PID LOG TIMEOUT_S CHECK...: poll CHECK until it succeeds; fail when the
# process exits or the timeout passes.
wait_for() {
  local name="$1" pid="$2" logf="$3" timeout="$4"
  shift 4
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || fail "$name (process exited)" "$logf"
    ((SECONDS < deadline)) || fail "$name (not ready after ${timeout}s)" "$logf"
    sleep 0.05
  done
}

# ---------------------------------------------------------------------------------------
# Binaries.
if [[ -n "${M3O_TOOLS_BIN:-}" ]]; then
  bin="$M3O_TOOLS_BIN"
else
  bin="$("$here/build-tools.sh")" || { log "hack/build-tools.sh failed"; exit 1; }
fi
for b in kube-apiserver etcd kubectl; do
  [[ -x "$bin/$b" ]] || { log "$bin/$b missing (run hack/build-tools.sh)"; exit 1; }
done
pg_bin="${PG_BIN:-}"
if [[ -z "$pg_bin" ]]; then
  pg_bin="$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -name postgres -path '*/bin/*' 2>/dev/null | sort -V | tail -n 1)"
  pg_bin="${pg_bin%/postgres}"
  [[ -n "$pg_bin" ]] || { pg_bin="$(command -v postgres || true)"; pg_bin="${pg_bin%/postgres}"; }
fi
[[ -x "$pg_bin/postgres" && -x "$pg_bin/initdb" ]] || { log "PostgreSQL server not found (run hack/install-deps.sh, or set PG_BIN)"; exit 1; }
command -v redis-server >/dev/null || { log "redis-server not found (run hack/install-deps.sh)"; exit 1; }
command -v openssl >/dev/null || { log "openssl not found (run hack/install-deps.sh)"; exit 1; }
kubectl="$bin/kubectl"

# ---------------------------------------------------------------------------------------
# Layout and ports. Servers run under setsid (their own session): a Ctrl-C in the terminal
# reaches this script and CMD only, and the teardown stops the servers in order (the
# apiserver before its etcd). Each setsid execs in place, so $! is the server's pid.
dir="$(mktemp -d "${TMPDIR:-/tmp}/m3o-env.XXXXXX")"
chmod 0711 "$dir" # the postgres user (when we are root) must reach its own subdirs
mkdir -p "$dir/logs" "$dir/pki"
chmod 0700 "$dir/pki"
mapfile -t ports < <(free_ports 7)
((${#ports[@]} == 7)) || { log "could not find free ports"; exit 1; }
etcd_cp_client="${ports[0]}" etcd_cp_peer="${ports[1]}"
etcd_cfg_client="${ports[2]}" etcd_cfg_peer="${ports[3]}"
apiserver_port="${ports[4]}" pg_port="${ports[5]}" redis_port="${ports[6]}"

tls="${M3O_TLS:-0}" tls_password=""
[[ "$tls" == 1 ]] && tls_password="$(openssl rand -hex 16)"
pki="$dir/pki"

# start_etcd NAME CLIENT_PORT PEER_PORT [TLS FLAGS...]
start_etcd() {
  local name="$1" scheme=http peer="http://127.0.0.1:$3"
  (($# > 3)) && scheme=https
  local client="$scheme://127.0.0.1:$2"
  setsid "$bin/etcd" --name "$name" --data-dir "$dir/$name" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$name=$peer" --initial-cluster-state new \
    --unsafe-no-fsync --log-level warn "${@:4}" \
    </dev/null >"$dir/logs/$name.log" 2>&1 &
  track "$name" $! TERM
}

# start_redis [FLAGS...]
start_redis() {
  setsid redis-server --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$dir" --daemonize no --protected-mode no "$@" \
    </dev/null >"$dir/logs/redis.log" 2>&1 &
  track redis $! TERM
}

# as_pg CMD...: PostgreSQL refuses to run as root; use the postgres system user then.
as_pg() {
  if ((EUID == 0)); then
    exec setpriv --reuid=postgres --regid=postgres --init-groups --reset-env -- "$@"
  else
    exec "$@"
  fi
}

# --- control-plane etcd, platform-config etcd, redis: start right away (with TLS, the
# last two once the PKI is made).
start_etcd etcd-cp "$etcd_cp_client" "$etcd_cp_peer"
if [[ "$tls" != 1 ]]; then
  start_etcd etcd-config "$etcd_cfg_client" "$etcd_cfg_peer"
  start_redis --port "$redis_port"
fi

# --- postgres: initdb (a second or so) in the background while the PKI is made.
mkdir -p "$dir/pg" "$dir/pg-run"
((EUID == 0)) && chown postgres: "$dir/pg" "$dir/pg-run"
# shellcheck disable=SC2016 # expanded by the inner shell
(
  as_pg bash -c '
    set -e
    "$1/initdb" -D "$2" -U m3o --auth=trust --no-sync --no-locale -E UTF8 -N
    echo "CREATE DATABASE m3o;" | "$1/postgres" --single -D "$2" -c fsync=off postgres
    if [[ -n "$3" ]]; then
      # README: PostgreSQL grants. The role owns its schema and may only connect.
      printf "%s\n" "CREATE ROLE m3o_operator LOGIN PASSWORD '"'"'$3'"'"';" \
        "REVOKE ALL ON DATABASE m3o FROM PUBLIC;" \
        "GRANT CONNECT ON DATABASE m3o TO m3o_operator;" \
        "CREATE SCHEMA m3o AUTHORIZATION m3o_operator;" |
        "$1/postgres" --single -D "$2" -c fsync=off m3o
      # TCP only with TLS (no plain host line); the superuser only on the socket.
      printf "%s\n" "local all all trust" "hostssl all m3o_operator 127.0.0.1/32 scram-sha-256" >"$2/pg_hba.conf"
    fi
  ' _ "$pg_bin" "$dir/pg/data" "$tls_password"
) </dev/null >"$dir/logs/postgres-init.log" 2>&1 &
pg_init_pid=$!

# --- PKI: CA, apiserver serving cert, admin client cert, service-account key; with
# M3O_TLS=1 also the backends' serving cert and the operator's client cert.
(
  set -e
  cd "$pki"
  key() { openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null; }
  key ca.key & key apiserver.key & key admin.key & key sa.key & wait
  if [[ "$tls" == 1 ]]; then
    key backend.key & key operator.key & key gateway.key & wait
    openssl req -new -key backend.key -subj "/CN=127.0.0.1" -out backend.csr
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=IP:127.0.0.1,DNS:localhost" >backend.ext
    openssl req -new -key operator.key -subj "/CN=m3o-operator" -out operator.csr
    openssl req -new -key gateway.key -subj "/CN=m3o-gateway" -out gateway.csr
  fi
  openssl req -x509 -new -key ca.key -subj "/CN=m3o-test-ca" -days 30 -out ca.crt \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
  openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
    >apiserver.ext
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
    -extfile apiserver.ext -out apiserver.crt 2>/dev/null
  openssl req -new -key admin.key -subj "/O=system:masters/CN=admin" -out admin.csr
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=clientAuth" >admin.ext
  openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
    -extfile admin.ext -out admin.crt 2>/dev/null
  openssl pkey -in sa.key -pubout -out sa.pub
  if [[ "$tls" == 1 ]]; then
    openssl x509 -req -in backend.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
      -extfile backend.ext -out backend.crt 2>/dev/null
    openssl x509 -req -in operator.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
      -extfile admin.ext -out operator.crt 2>/dev/null
    openssl x509 -req -in gateway.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
      -extfile admin.ext -out gateway.crt 2>/dev/null
  fi
) >"$dir/logs/pki.log" 2>&1 || fail "PKI generation (openssl)" "$dir/logs/pki.log"

b64() { base64 -w0 <"$1"; }
kubeconfig="$dir/kubeconfig"
cat >"$kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: m3o-test
  cluster:
    server: https://127.0.0.1:$apiserver_port
    certificate-authority-data: $(b64 "$pki/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$pki/admin.crt")
    client-key-data: $(b64 "$pki/admin.key")
contexts:
- name: m3o-test
  context:
    cluster: m3o-test
    user: admin
current-context: m3o-test
EOF
chmod 0600 "$kubeconfig"

# --- with TLS: platform etcd (auth is enabled below) and redis (ACL users).
if [[ "$tls" == 1 ]]; then
  start_etcd etcd-config "$etcd_cfg_client" "$etcd_cfg_peer" \
    --cert-file "$pki/backend.crt" --key-file "$pki/backend.key" \
    --trusted-ca-file "$pki/ca.crt" --client-cert-auth
  # README: Redis grants (the operator), and an unrestricted admin for looking around.
  start_redis --port 0 --tls-port "$redis_port" \
    --tls-cert-file "$pki/backend.crt" --tls-key-file "$pki/backend.key" \
    --tls-ca-cert-file "$pki/ca.crt" --tls-auth-clients optional \
    --user default off \
    --user admin on ">$tls_password" '~*' '&*' +@all \
    --user m3o-operator on ">$tls_password" resetkeys '~events:*' resetchannels -@all \
    +ping +xadd +multi +exec '+xinfo|groups' \
    '~m3o:gateway:usage:*' +scan +hgetall +expire \
    --user m3o-gateway on ">$tls_password" resetkeys '~m3o:gateway:*' resetchannels -@all \
    +ping +evalsha '+script|load' +time +get +set +incr +expire +hincrby
  printf '%s\n' "$tls_password" >"$dir/etcd-password"
  chmod 0600 "$dir/etcd-password"
fi
# etcd_tls PATH [JSON]: a request to the TLS platform etcd (GET, or POST with JSON).
etcd_tls() {
  curl -sf --cacert "$pki/ca.crt" --cert "$pki/operator.crt" --key "$pki/operator.key" \
    ${2:+-X POST -d "$2"} "https://127.0.0.1:$etcd_cfg_client$1"
}
redis_tls_ping() {
  redis-cli --tls --cacert "$pki/ca.crt" -h 127.0.0.1 -p "$redis_port" \
    --user admin --pass "$tls_password" --no-auth-warning ping | grep -q PONG
}

# --- kube-apiserver, once its etcd answers.
wait_for etcd-cp "${pid_of[etcd-cp]}" "$dir/logs/etcd-cp.log" 30 http_ok 127.0.0.1 "$etcd_cp_client" /health
setsid "$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_cp_client" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$apiserver_port" \
  --cert-dir "$dir/apiserver" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$pki/sa.pub" \
  --service-account-signing-key-file "$pki/sa.key" \
  --service-cluster-ip-range 10.0.0.0/24 \
  --disable-admission-plugins ServiceAccount \
  --allow-privileged=true \
  --enable-priority-and-fairness=false \
  --v 1 \
  </dev/null >"$dir/logs/kube-apiserver.log" 2>&1 &
track kube-apiserver $! TERM

# --- postgres server, once initdb is done.
if ! wait "$pg_init_pid"; then pg_init_pid=""; fail "postgres (initdb)" "$dir/logs/postgres-init.log"; fi
pg_init_pid=""
pg_tls=()
if [[ "$tls" == 1 ]]; then
  # The key must belong to the server's user and be private to it.
  install -m 0600 "$pki/backend.key" "$dir/pg/server.key"
  ((EUID == 0)) && chown postgres: "$dir/pg/server.key"
  install -m 0644 "$pki/ca.crt" "$pki/backend.crt" "$dir/pg/"
  pg_tls=(-c ssl=on -c "ssl_cert_file=$dir/pg/backend.crt" -c "ssl_key_file=$dir/pg/server.key"
    -c "ssl_ca_file=$dir/pg/ca.crt")
fi
# M3O_PG_STATEMENTS=1 (make bench): count statements, for the benchmark's Postgres figures.
pg_statements=()
if [[ "${M3O_PG_STATEMENTS:-}" == 1 ]]; then
  pg_statements=(-c shared_preload_libraries=pg_stat_statements)
fi
(
  as_pg setsid "$pg_bin/postgres" -D "$dir/pg/data" -p "$pg_port" -k "$dir/pg-run" \
    -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
    -c full_page_writes=off -c max_connections=300 -c shared_buffers=128MB \
    "${pg_tls[@]}" "${pg_statements[@]}"
) </dev/null >"$dir/logs/postgres.log" 2>&1 &
track postgres $! INT # SIGINT: fast shutdown (SIGTERM would wait for clients)

# shellcheck disable=SC2317 # invoked through wait_for
pg_ready() {
  if [[ -x "$pg_bin/pg_isready" ]]; then
    "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" -d m3o -U m3o
  else
    grep -q 'ready to accept connections' "$dir/logs/postgres.log"
  fi
}
if [[ "$tls" == 1 ]]; then
  wait_for etcd-config "${pid_of[etcd-config]}" "$dir/logs/etcd-config.log" 30 etcd_tls /health
  # README: etcd grants. The role reads and writes the prefixes /m3o/ and
  # /m3o.writer-epoch (the writer-fence keys beside it, one per shard).
  b64s() { printf '%s' "$1" | base64 -w0; }
  path=""
  for req in \
    /v3/auth/user/add '{"name":"root","password":"'"$tls_password"'"}' \
    /v3/auth/user/grant '{"user":"root","role":"root"}' \
    /v3/auth/role/add '{"name":"m3o-operator"}' \
    /v3/auth/role/grant '{"name":"m3o-operator","perm":{"permType":"READWRITE","key":"'"$(b64s /m3o/)"'","range_end":"'"$(b64s /m3o0)"'"}}' \
    /v3/auth/role/grant '{"name":"m3o-operator","perm":{"permType":"READWRITE","key":"'"$(b64s /m3o.writer-epoch)"'","range_end":"'"$(b64s /m3o.writer-epoci)"'"}}' \
    /v3/auth/user/add '{"name":"m3o-operator","password":"'"$tls_password"'"}' \
    /v3/auth/user/grant '{"user":"m3o-operator","role":"m3o-operator"}' \
    /v3/auth/role/add '{"name":"m3o-gateway"}' \
    /v3/auth/role/grant '{"name":"m3o-gateway","perm":{"permType":"READ","key":"'"$(b64s /m3o/)"'","range_end":"'"$(b64s /m3o0)"'"}}' \
    /v3/auth/role/grant '{"name":"m3o-gateway","perm":{"permType":"READWRITE","key":"'"$(b64s /m3o/gateways/)"'","range_end":"'"$(b64s /m3o/gateways0)"'"}}' \
    /v3/auth/user/add '{"name":"m3o-gateway","password":"'"$tls_password"'"}' \
    /v3/auth/user/grant '{"user":"m3o-gateway","role":"m3o-gateway"}' \
    /v3/auth/enable '{}'; do
    if [[ "$req" == /* ]]; then path="$req"; continue; fi
    etcd_tls "$path" "$req" >>"$dir/logs/etcd-config.log" 2>&1 ||
      fail "etcd-config (auth setup: $path)" "$dir/logs/etcd-config.log"
  done
  wait_for redis "${pid_of[redis]}" "$dir/logs/redis.log" 30 redis_tls_ping
else
  wait_for etcd-config "${pid_of[etcd-config]}" "$dir/logs/etcd-config.log" 30 http_ok 127.0.0.1 "$etcd_cfg_client" /health
  wait_for redis "${pid_of[redis]}" "$dir/logs/redis.log" 30 redis_ping 127.0.0.1 "$redis_port"
fi
wait_for postgres "${pid_of[postgres]}" "$dir/logs/postgres.log" 30 pg_ready
wait_for kube-apiserver "${pid_of[kube-apiserver]}" "$dir/logs/kube-apiserver.log" 90 \
  "$kubectl" --kubeconfig "$kubeconfig" --request-timeout 5s get --raw /readyz
wait_for "kube-apiserver (namespace default)" "${pid_of[kube-apiserver]}" "$dir/logs/kube-apiserver.log" 30 \
  "$kubectl" --kubeconfig "$kubeconfig" --request-timeout 5s get namespace default

# ---------------------------------------------------------------------------------------
# Exports.
export KUBECONFIG="$kubeconfig"
tls_vars=()
if [[ "$tls" == 1 ]]; then
  export DATABASE_URL="postgres://m3o_operator:$tls_password@127.0.0.1:$pg_port/m3o?sslmode=verify-full&sslrootcert=$pki/ca.crt"
  export REDIS_URL="rediss://m3o-operator:$tls_password@127.0.0.1:$redis_port"
  export ETCD_ENDPOINTS="https://127.0.0.1:$etcd_cfg_client"
  export M3O_REDIS_CA_FILE="$pki/ca.crt" M3O_ETCD_CA_FILE="$pki/ca.crt"
  export M3O_ETCD_CERT_FILE="$pki/operator.crt" M3O_ETCD_KEY_FILE="$pki/operator.key"
  export M3O_ETCD_USERNAME=m3o-operator M3O_ETCD_PASSWORD_FILE="$dir/etcd-password"
  tls_vars=(M3O_REDIS_CA_FILE M3O_ETCD_CA_FILE M3O_ETCD_CERT_FILE M3O_ETCD_KEY_FILE M3O_ETCD_USERNAME M3O_ETCD_PASSWORD_FILE)
  # The gateway's own identity: `source $M3O_ENV_DIR/gateway.env` before m3o-gateway-auth.
  {
    printf 'export REDIS_URL=%q\n' "rediss://m3o-gateway:$tls_password@127.0.0.1:$redis_port"
    printf 'export M3O_ETCD_CERT_FILE=%q M3O_ETCD_KEY_FILE=%q\n' "$pki/gateway.crt" "$pki/gateway.key"
    printf 'export M3O_ETCD_USERNAME=m3o-gateway\n'
  } >"$dir/gateway.env"
else
  export DATABASE_URL="postgres://m3o:m3o@127.0.0.1:$pg_port/m3o"
  export REDIS_URL="redis://127.0.0.1:$redis_port"
  export ETCD_ENDPOINTS="http://127.0.0.1:$etcd_cfg_client"
fi
export M3O_ENV_DIR="$dir"
export M3O_TEST_ENV=1
export PATH="$bin:$PATH"
# kubectl's discovery cache, per environment (not ~/.kube/cache, one dir per random port).
export KUBECACHEDIR="$dir/kube-cache"
{
  for v in KUBECONFIG DATABASE_URL REDIS_URL ETCD_ENDPOINTS M3O_ENV_DIR M3O_TEST_ENV KUBECACHEDIR "${tls_vars[@]}"; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
  # shellcheck disable=SC2016 # $PATH is expanded when the file is sourced
  printf 'export PATH=%q:"$PATH"\n' "$bin"
} >"$dir/env"

# --- CRDs from the chart, when there are any.
crd_dir="${M3O_CRD_DIR:-$root/charts/m3o-operator/crds}"
if grep -qsE '^kind:' "$crd_dir"/*.yaml "$crd_dir"/*.yml; then
  kubectl apply --server-side -f "$crd_dir" >"$dir/logs/crds.log" 2>&1 || fail "CRD install" "$dir/logs/crds.log"
  kubectl wait --for condition=established crd --all --timeout=60s >>"$dir/logs/crds.log" 2>&1 ||
    fail "CRD install (not Established)" "$dir/logs/crds.log"
  rm -rf "$KUBECACHEDIR" # discovery cached before the CRDs existed
fi

log "ready in $(($(now_ms) - start_ms)) ms: $dir"

# ---------------------------------------------------------------------------------------
if [[ "$mode" == up ]]; then
  cat >&2 <<EOF
env: up. In another shell:
    source $dir/env
  apiserver https://127.0.0.1:$apiserver_port  postgres $DATABASE_URL
  redis $REDIS_URL  platform etcd $ETCD_ENDPOINTS  logs $dir/logs/
  Ctrl-C stops everything.
EOF
  set +e
  # Returns when any server exits (or on a signal, through the traps).
  wait -n "${pids[@]}"
  for i in "${!pids[@]}"; do
    kill -0 "${pids[i]}" 2>/dev/null || fail "${names[i]} (exited unexpectedly)" "$dir/logs/${names[i]}.log"
  done
  exit 1
fi

set +e
"$@"
exit $?
