# shellcheck shell=bash
# Small helpers shared by hack/env.sh and hack/demo.sh. Source it; it defines functions only.

# free_ports N: prints N distinct free TCP ports on 127.0.0.1, one per line. All sockets
# are held open together, so the kernel never hands out the same port twice.
free_ports() {
  local n="$1"
  if command -v python3 >/dev/null 2>&1; then
    python3 - "$n" <<'EOF' && return 0
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print("\n".join(str(s.getsockname()[1]) for s in socks))
EOF
  fi
  # Fallback without python: probe random high ports for a listener.
  local -A seen=()
  local p found=0
  while ((found < n)); do
    p=$((20000 + RANDOM % 30000))
    [[ -n "${seen[$p]:-}" ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      seen[$p]=1
      echo "$p"
      found=$((found + 1))
    fi
  done
}

# http_status HOST PORT PATH: prints the HTTP status code of a plain-HTTP GET (no curl).
http_status() {
  local host="$1" port="$2" path="$3" fd line
  exec {fd}<>"/dev/tcp/$host/$port" || return 1
  printf 'GET %s HTTP/1.0\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' "$path" "$host" "$port" >&"$fd"
  IFS= read -r -t 5 line <&"$fd" || { exec {fd}>&-; return 1; }
  exec {fd}>&-
  line="${line%$'\r'}"
  [[ "$line" =~ ^HTTP/[0-9.]+\ ([0-9]{3}) ]] || return 1
  echo "${BASH_REMATCH[1]}"
}

# http_ok HOST PORT PATH: true when GET returns 200.
http_ok() { [[ "$(http_status "$@" 2>/dev/null)" == 200 ]]; }

# redis_ping HOST PORT: true when the server answers PING with +PONG.
redis_ping() { _redis_ping "$@" 2>/dev/null; }
_redis_ping() {
  local fd line
  exec {fd}<>"/dev/tcp/$1/$2" || return 1
  printf 'PING\r\n' >&"$fd"
  IFS= read -r -t 2 line <&"$fd" || { exec {fd}>&-; return 1; }
  exec {fd}>&-
  [[ "$line" == "+PONG"* ]]
}

# now_ms: milliseconds since the epoch.
now_ms() { echo $(($(date +%s%N) / 1000000)); }
