#!/usr/bin/env bash
# The demo, run inside the local environment: `hack/env.sh run -- hack/demo.sh`
# (`make demo`). Starts target/debug/m3o-operator, waits for /readyz, applies examples/,
# waits for the Customers to be Ready and prints what the operator made. Then calls a
# demo API through nginx, which asks m3o-gateway-auth about every request: alice's key
# (200), mallory's (401), and alice's again once it is blocked (401).
# M3O_DEMO_HOLD=1 keeps the operator running until Ctrl-C.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source-path=SCRIPTDIR
source "$here/lib.sh"
log() { echo "demo: $*" >&2; }

[[ "${M3O_TEST_ENV:-}" == 1 && -n "${M3O_ENV_DIR:-}" ]] || {
  log "run me inside the environment: hack/env.sh run -- hack/demo.sh"
  exit 1
}
operator="${M3O_OPERATOR_BIN:-$root/target/debug/m3o-operator}"
[[ -x "$operator" ]] || { log "$operator not built (cargo build -p m3o-operator)"; exit 1; }

port="$(free_ports 1)"
oplog="$M3O_ENV_DIR/logs/m3o-operator.log"
op_pid=""
gateway_pids=()
stop_gateway() {
  local pid
  for pid in "${gateway_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  gateway_pids=()
}
stop_operator() {
  stop_gateway
  [[ -n "$op_pid" ]] || return 0
  kill -TERM "$op_pid" 2>/dev/null || true
  local deadline=$((SECONDS + 15))
  while kill -0 "$op_pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
  kill -KILL "$op_pid" 2>/dev/null || true
  wait "$op_pid" 2>/dev/null || true
  op_pid=""
}
trap stop_operator EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  log "$1"
  log "last lines of $oplog:"
  tail -n 40 "$oplog" | sed 's/^/    /' >&2
  exit 1
}

# Every key and value under /m3o/, via etcd's JSON gateway (no etcdctl needed).
print_platform_config() {
  python3 - "${ETCD_ENDPOINTS%%,*}" <<'PY'
import base64, json, sys, urllib.request
b64 = lambda s: base64.b64encode(s.encode()).decode()
body = json.dumps({"key": b64("/m3o/"), "range_end": b64("/m3o0")}).encode()
with urllib.request.urlopen(urllib.request.Request(sys.argv[1] + "/v3/kv/range", data=body)) as r:
    for kv in json.load(r).get("kvs", []):
        print(base64.b64decode(kv["key"]).decode(), base64.b64decode(kv["value"]).decode())
PY
}

# What a platform admin wants to see after the examples: the records and the gateway's
# config; the demo then ends with one customer's whole story (`m3o-operator inspect`).
summary() {
  echo "== Postgres: customers, subscriptions, api_keys (hashes only)"
  psql "$DATABASE_URL" -P pager=off -c "SET search_path = m3o" \
    -c "SELECT id, email, status, k8s_namespace || '/' || k8s_name AS resource FROM customers ORDER BY created_at" \
    -c "SELECT id, customer_id, plan, monthly_requests, requests_per_second, status FROM subscriptions ORDER BY created_at" \
    -c "SELECT id, key_prefix, left(key_hash, 16) || '...' AS key_hash, scopes, status FROM api_keys ORDER BY created_at" ||
    log "could not query Postgres"
  echo "== etcd platform config (what the gateway reads)"
  print_platform_config || log "could not read etcd at $ETCD_ENDPOINTS"
}

log "starting $operator (log: $oplog)"
"$operator" run --metrics-addr "127.0.0.1:$port" >"$oplog" 2>&1 &
op_pid=$!

deadline=$((SECONDS + 60))
until http_ok 127.0.0.1 "$port" /readyz; do
  kill -0 "$op_pid" 2>/dev/null || fail "the operator exited during start-up"
  ((SECONDS < deadline)) || fail "the operator is not ready after 60s (GET /readyz on 127.0.0.1:$port)"
  sleep 0.2
done
log "operator ready: http://127.0.0.1:$port/readyz"

echo "== CRDs"
kubectl get crd

examples="$root/examples"
if grep -qsE '^kind:' "$examples"/*.yaml "$examples"/*.yml; then
  echo "== applying examples/"
  if [[ -f "$examples/kustomization.yaml" ]]; then
    kubectl apply -k "$examples"
  else
    kubectl apply -f "$examples"
  fi
  for kind in customers subscriptions apikeys; do
    if [[ -n "$(kubectl get "$kind.m3o.com" -A -o name 2>/dev/null)" ]]; then
      echo "== waiting for $kind to be Ready"
      kubectl wait --for=condition=Ready --all "$kind.m3o.com" -A --timeout=120s ||
        fail "$kind did not become Ready"
    fi
  done
  echo "== kubectl get m3o -A"
  kubectl get m3o -A -o wide || true
  summary
  echo "== m3o-operator inspect customer alice -n m3o-demo (also: kubectl m3o inspect ...)"
  "$operator" inspect customer alice -n m3o-demo || fail "inspect failed"
else
  log "examples/ has no manifests; nothing to apply"
fi

# The gateway side: nginx in front of a demo API, asking m3o-gateway-auth (auth_request).
call() { # call KEY: "<status> <body>" of GET /v1/helloworld/Call through nginx (a refusal: its challenge)
  local status out="$M3O_ENV_DIR/demo-response"
  status="$(curl -sS -o "$out.body" -D "$out.headers" -w '%{http_code}' -H "Authorization: Bearer $1" \
    "http://127.0.0.1:$nginx_port/v1/helloworld/Call?name=demo" || true)"
  if [[ "$status" == 200 ]]; then
    echo "$status $(head -c 300 "$out.body")"
  else
    echo "$status $(grep -i '^www-authenticate:' "$out.headers" | tr -d '\r')"
  fi
}
secret_key() { kubectl get secret -n m3o-demo "$1" -o jsonpath='{.data.apiKey}' | base64 -d; }
expect() { # expect WHAT STATUS RESULT
  echo "$1: $3"
  [[ "$3" == "$2 "* ]] || fail "$1: expected HTTP $2"
}
gateway_demo() {
  local gateway="${M3O_GATEWAY_BIN:-$root/target/debug/m3o-gateway-auth}"
  [[ -x "$gateway" ]] || fail "$gateway not built (cargo build -p m3o-gateway)"
  [[ -x /usr/sbin/nginx ]] || fail "nginx not installed (hack/install-deps.sh installs nginx-light)"
  local ports auth_port gw_ops api_port ngx="$M3O_ENV_DIR/nginx"
  mapfile -t ports < <(free_ports 4)
  auth_port="${ports[0]}" gw_ops="${ports[1]}" api_port="${ports[2]}" nginx_port="${ports[3]}"
  log "starting $gateway (log: $M3O_ENV_DIR/logs/m3o-gateway-auth.log)"
  "$gateway" --listen "127.0.0.1:$auth_port" --metrics-addr "127.0.0.1:$gw_ops" \
    --replica-id demo-1 >"$M3O_ENV_DIR/logs/m3o-gateway-auth.log" 2>&1 &
  gateway_pids+=($!)
  python3 - "$api_port" <<'PY' &
import http.server, json, sys
class DemoApi(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"message": "hello from the demo API",
                           "customerId": self.headers.get("X-M3O-Customer-Id"),
                           "keyId": self.headers.get("X-M3O-Key-Id")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), DemoApi).serve_forever()
PY
  gateway_pids+=($!)
  mkdir -p "$ngx/tmp"
  "$gateway" nginx-config --listen "127.0.0.1:$nginx_port" --auth "127.0.0.1:$auth_port" \
    --upstream "127.0.0.1:$api_port" --standalone-dir "$ngx" >"$ngx/nginx.conf"
  /usr/sbin/nginx -p "$ngx" -c "$ngx/nginx.conf" -e "$ngx/error.log" &
  gateway_pids+=($!)
  local deadline=$((SECONDS + 30))
  until http_ok 127.0.0.1 "$gw_ops" /readyz && http_status 127.0.0.1 "$nginx_port" / >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "gateway or nginx not up after 30s (see $M3O_ENV_DIR/logs/m3o-gateway-auth.log, $ngx/error.log)"
    sleep 0.2
  done
  echo "== nginx (auth_request -> m3o-gateway-auth) on 127.0.0.1:$nginx_port in front of the demo API"
  local alice mallory
  alice="$(secret_key alice-all-api-key)"
  mallory="$(secret_key mallory-key-api-key)"
  expect "alice's key" 200 "$(call "$alice")"
  expect "mallory's key (blocked)" 401 "$(call "$mallory")"
  echo "== kubectl patch apikey alice-all blocked: true; wait for GatewaySynced"
  kubectl patch apikeys.m3o.com -n m3o-demo alice-all --type merge \
    -p '{"spec":{"blocked":true,"blockedMessage":"blocked in the demo"}}'
  kubectl wait --for=jsonpath='{.status.state}'=blocked apikeys.m3o.com/alice-all -n m3o-demo --timeout=60s
  kubectl wait --for=condition=GatewaySynced apikeys.m3o.com/alice-all -n m3o-demo --timeout=60s
  kubectl get apikeys.m3o.com -n m3o-demo alice-all \
    -o jsonpath='{range .status.conditions[?(@.type=="GatewaySynced")]}GatewaySynced={.status}: {.message}{"\n"}{end}'
  expect "alice's key, blocked" 401 "$(call "$alice")"
}
if [[ -f "$examples/apikey-alice-all.yaml" ]]; then
  gateway_demo
fi

if [[ "${M3O_DEMO_HOLD:-}" == 1 ]]; then
  log "holding (M3O_DEMO_HOLD=1); in another shell: source $M3O_ENV_DIR/env. Ctrl-C stops."
  while kill -0 "$op_pid" 2>/dev/null; do
    wait "$op_pid" || true
  done
  fail "the operator exited"
fi
stop_operator
log "done"
