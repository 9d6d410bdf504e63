#!/bin/sh
# Installs the Debian packages the test suite drives for real (redis-server, chromium, nginx,
# gcc, openssl)
# when they are missing. Needs root; otherwise it names what to install and fails.
#
# The tests start their own redis-server and nginx (free ports, private config), so the
# system services these packages come with must not run: a policy-rc.d that answers 101
# keeps the packages' postinst from starting them, and any that runs anyway (systemd
# starts units itself) is stopped and disabled afterwards. Safe to run again.
set -eu
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
command -v gcc >/dev/null 2>&1 || missing="$missing gcc"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: missing Debian packages:$missing (run as root, or: sudo apt-get install$missing)" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
saved="$policy.install-system-deps.$$"
restore_policy() {
    rm -f "$policy"
    if [ -e "$saved" ]; then mv "$saved" "$policy"; fi
}
if [ -e "$policy" ]; then mv "$policy" "$saved"; fi
trap restore_policy EXIT
trap 'exit 130' INT TERM
printf '#!/bin/sh\n# install-system-deps.sh: no service starts while packages install\nexit 101\n' >"$policy"
chmod 755 "$policy"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
restore_policy
trap - EXIT

# pid_running PIDFILE NAME: the pid in PIDFILE is a live process called NAME.
pid_running() {
    [ -r "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    case "$pid" in '' | *[!0-9]*) return 1 ;; esac
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

# stop_service UNIT PIDFILE NAME: stop (and keep from starting at boot) a packaged service.
stop_service() {
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now "$1" >/dev/null 2>&1 || true
    elif [ -x "/etc/init.d/$1" ] && command -v service >/dev/null 2>&1; then
        pid_running "$2" "$3" && { service "$1" stop >/dev/null 2>&1 || true; }
    fi
    if pid_running "$2" "$3"; then
        kill "$(cat "$2")" 2>/dev/null || true
        i=0
        while pid_running "$2" "$3" && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
        if pid_running "$2" "$3"; then kill -9 "$(cat "$2")" 2>/dev/null || true; fi
    fi
    if pid_running "$2" "$3"; then
        echo "install-system-deps: could not stop the system $1 service" >&2
        return 1
    fi
}

case " $missing " in *" redis-server "*) stop_service redis-server /run/redis/redis-server.pid redis-server ;; esac
case " $missing " in *" nginx "*) stop_service nginx /run/nginx.pid nginx ;; esac
exit 0
