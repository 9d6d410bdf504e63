#!/bin/sh
# Installs the Debian packages the test suite drives for real (redis-server, chromium, nginx,
# gcc (and python3-dev when the interpreter has no headers: the compiled hot path), openssl,
# and systemd for systemd-analyze, which checks deploy/rtcsignal.service) when
# they are missing. Installing systemd in a container does not make it the init system.
# Needs root; otherwise it names what to install and fails.
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
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
# Python's headers, to build the compiled hot path (setup.py): Debian's python3 keeps them in
# python3-dev; an interpreter built from source (pyenv) has its own.
py_include=$(${PYTHON:-python3} -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
[ -n "$py_include" ] && [ ! -f "$py_include/Python.h" ] && missing="$missing python3-dev"
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

# service_pids NAME: the running processes of NAME's packaged system service, told apart from
# the private copies the tests start (those run as root with their own -p/-c or config file):
# redis-server running as the redis user, an nginx master on the default /etc/nginx/nginx.conf
# (its title is "nginx: master process /usr/sbin/nginx" plus, under systemd, "-g daemon on;
# master_process on;"). Reads /proc, so it needs neither pgrep nor a pidfile.
service_pids() {
    for dir in /proc/[0-9]*; do
        [ "$(cat "$dir/comm" 2>/dev/null)" = "$1" ] || continue
        case "$1" in
        redis-server)
            [ "$(stat -c %U "$dir" 2>/dev/null)" = redis ] && echo "${dir#/proc/}" ;;
        nginx)
            title=$(tr '\0' ' ' <"$dir/cmdline" 2>/dev/null | sed 's/ *$//')
            case "$title" in
            "nginx: master process /usr/sbin/nginx" | "nginx: master process /usr/sbin/nginx -g "*)
                echo "${dir#/proc/}" ;;
            esac ;;
        esac
    done
}

# stop_service UNIT NAME: stop the packaged service UNIT (process NAME) and keep it from
# starting at boot; fails if one of its processes is still running afterwards.
stop_service() {
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now "$1" >/dev/null 2>&1 || true
    else
        if [ -n "$(service_pids "$2")" ] && command -v service >/dev/null 2>&1; then
            service "$1" stop >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null 2>&1; then
            update-rc.d "$1" disable >/dev/null 2>&1 || true
        fi
    fi
    pids=$(service_pids "$2")
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill $pids 2>/dev/null || true
        i=0
        while [ -n "$(service_pids "$2")" ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
        pids=$(service_pids "$2")
        # shellcheck disable=SC2086
        if [ -n "$pids" ]; then kill -9 $pids 2>/dev/null || true; sleep 0.2; fi
    fi
    if [ -n "$(service_pids "$2")" ]; then
        echo "install-system-deps: could not stop the system $1 service (pids: $(service_pids "$2" | tr '\n' ' '))" >&2
        return 1
    fi
}

status=0
case " $missing " in *" redis-server "*) stop_service redis-server redis-server || status=1 ;; esac
case " $missing " in *" nginx "*) stop_service nginx nginx || status=1 ;; esac
[ "$status" -eq 0 ] && echo "install-system-deps: installed$missing (their system services left stopped and disabled)" >&2
exit "$status"
