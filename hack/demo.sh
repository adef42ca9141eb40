#!/usr/bin/env bash
# The demo, run inside the local environment: `hack/env.sh run -- hack/demo.sh`
# (`make demo`). Starts target/debug/m3o-operator, waits for /readyz, applies examples/,
# waits for the Customers to be Ready and prints what the operator made.
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
stop_operator() {
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

if [[ "${M3O_DEMO_HOLD:-}" == 1 ]]; then
  log "holding (M3O_DEMO_HOLD=1); in another shell: source $M3O_ENV_DIR/env. Ctrl-C stops."
  while kill -0 "$op_pid" 2>/dev/null; do
    wait "$op_pid" || true
  done
  fail "the operator exited"
fi
stop_operator
log "done"
