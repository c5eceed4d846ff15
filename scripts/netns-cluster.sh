#!/usr/bin/env bash
# netns-cluster.sh - a tiny test "cluster" of Linux network namespaces on one
# machine, each running its own sshd, so integration tests can launch
# processes over real SSH onto distinct "hosts". Must run as root.
#
# Usage:
#   scripts/netns-cluster.sh up N DIR   create N hosts, state/keys/logs in DIR
#   scripts/netns-cluster.sh down DIR   tear down (idempotent, never fails)
#   scripts/netns-cluster.sh --help
#
# Environment:
#   DSM_NETNS_PREFIX  name prefix (default: dsmnode)
#   DSM_NETNS_SUBNET  first three octets of the /24 (default: 10.77.0)
#
# Topology (PREFIX=dsmnode, SUBNET=10.77.0):
#   root namespace : bridge "dsmnodebr" with 10.77.0.1/24
#   host i (1..N)  : namespace "dsmnode<i>", interface eth0 = 10.77.0.<i+1>/24,
#                    peer "dsmnodev<i>" attached to the bridge, lo up;
#                    sshd on 10.77.0.<i+1>:22 only, own UTS namespace with
#                    hostname "dsmnode<i>", key-only root login.
#
# Files written to DIR (DIR must not contain whitespace):
#   DIR/hosts          one IP per line, host 1 first
#   DIR/namespaces     one namespace name per line, same order
#   DIR/ssh_command    one line: the ssh command to use, append "root@IP cmd..."
#   DIR/id_ed25519     client private key (no passphrase), authorized for root
#   DIR/authorized_keys, DIR/prefix
#   DIR/node<i>/       sshd_config, ssh_host_ed25519_key, sshd.pid, sshd.log
#
# "up" first removes leftovers of the same prefix (rerunnable), waits (~10 s)
# until "ssh root@IP true" works for every host, checks cross-namespace TCP
# (ssh from namespace 1 to host 2), and prints a one-line summary. On any
# failure it tears everything down again and exits non-zero.
#
# "down" kills every process living in the namespaces (sshds and anything
# launched over ssh), deletes the namespaces (and thus the veths) and the
# bridge. DIR itself (keys, logs) is left in place.
#
# Notes for callers:
#   * All hosts share the file system and the PID space; only network and
#     hostname differ. Remote commands start in /root with sshd's default PATH,
#     and the client environment is NOT forwarded: use absolute paths and pass
#     variables inline (e.g. "env FOO=1 /abs/path/bin").
#   * Bridged traffic must not be filtered, so "up" sets the global sysctls
#     net.bridge.bridge-nf-call-{iptables,ip6tables,arptables}=0 when they
#     exist (br_netfilter loaded); they are not restored by "down".
set -euo pipefail

PREFIX="${DSM_NETNS_PREFIX:-dsmnode}"
SUBNET="${DSM_NETNS_SUBNET:-10.77.0}"
SSHD=/usr/sbin/sshd
WAIT_SECS=10

usage() {
    sed -n '2,/^set -euo pipefail$/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
    echo "netns-cluster: error: $*" >&2
    exit 1
}

log() {
    echo "netns-cluster: $*" >&2
}

need() { # need BINARY APT_PACKAGE
    local bin=$1 pkg=$2
    if [[ $bin == /* ]]; then
        [[ -x $bin ]] && return 0
    elif command -v "$bin" >/dev/null 2>&1; then
        return 0
    fi
    die "required binary '$bin' not found; install it with: apt-get install -y $pkg"
}

check_deps() {
    need ip iproute2
    need "$SSHD" openssh-server
    need ssh openssh-client
    need ssh-keygen openssh-client
    need unshare util-linux
    [[ $(id -u) -eq 0 ]] || die "must run as root"
}

check_prefix() {
    [[ $1 =~ ^[A-Za-z][A-Za-z0-9_-]*$ ]] ||
        die "invalid prefix '$1' (letters, digits, '_' and '-' only, starting with a letter)"
}

# Absolute path of DIR (created if missing).
abs_dir() {
    local d=$1
    [[ -n $d ]] || die "DIR must not be empty"
    [[ $d =~ [[:space:]] ]] && die "DIR must not contain whitespace: '$d'"
    mkdir -p -- "$d"
    (cd -- "$d" && pwd -P)
}

# Namespaces named PREFIX<number> that currently exist.
prefix_namespaces() {
    local p=$1
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${p}[0-9]+\$" || true
}

# True if PID exists and is not a zombie (zombies may linger if PID 1 is slow
# to reap them).
alive() {
    local st
    st=$(sed -e 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && ${st:0:1} != Z ]]
}

# kill_pids PID... : TERM, wait up to ~2 s, then KILL.
kill_pids() {
    local pids=() left=() p i
    for p in "$@"; do
        [[ $p =~ ^[0-9]+$ ]] && [[ $p -ne $$ ]] && pids+=("$p")
    done
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
        left=()
        for p in "${pids[@]}"; do
            if alive "$p"; then left+=("$p"); fi
        done
        ((${#left[@]})) || break
        sleep 0.1
    done
    ((${#left[@]} == 0)) || kill -KILL "${left[@]}" 2>/dev/null || true
    # Give PID 1 up to ~2 s to reap the zombies, so "pgrep sshd" is clean
    # right after "down" (instant on a normal init; never fails).
    for ((i = 0; i < 20; i++)); do
        left=()
        for p in "${pids[@]}"; do
            if [[ -e /proc/$p ]]; then left+=("$p"); fi
        done
        ((${#left[@]})) || return 0
        sleep 0.1
    done
}

# cleanup_prefix PREFIX [EXTRA_PID...]: kill EXTRA_PIDs and every process in
# the PREFIX<n> namespaces, delete those namespaces, stray veths and the bridge.
# Never fails.
cleanup_prefix() {
    local p=$1 ns link
    shift
    local pids=("$@") nss=()
    mapfile -t nss < <(prefix_namespaces "$p")
    for ns in "${nss[@]}"; do
        # shellcheck disable=SC2207
        pids+=($(ip netns pids "$ns" 2>/dev/null || true))
    done
    kill_pids "${pids[@]}"
    for ns in "${nss[@]}"; do
        ip netns del "$ns" 2>/dev/null || true
    done
    # Stray root-namespace links from a half-finished "up".
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 |
        grep -E "^${p}(v|p)[0-9]+\$" || true); do
        ip link del "$link" 2>/dev/null || true
    done
    ip link del "${p}br" 2>/dev/null || true
}

# Kill sshds recorded in DIR's pid files and clean up DIR's prefix (from
# DIR/prefix, else the current PREFIX). Never fails.
cleanup_dir() {
    local dir=$1 p=$PREFIX pidf pid pids=()
    if [[ -s $dir/prefix ]]; then
        p=$(head -n1 "$dir/prefix")
        [[ $p =~ ^[A-Za-z][A-Za-z0-9_-]*$ ]] || p=$PREFIX
    fi
    for pidf in "$dir"/node*/sshd.pid; do
        [[ -f $pidf ]] || continue
        pid=$(head -n1 "$pidf" 2>/dev/null || true)
        if [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null || true) == sshd ]]; then
            pids+=("$pid")
        fi
        rm -f "$pidf"
    done
    cleanup_prefix "$p" "${pids[@]}"
    return 0
}

cmd_down() {
    [[ $# -eq 1 ]] || { usage >&2; exit 2; }
    check_deps
    check_prefix "$PREFIX"
    local dir=$1
    if [[ -d $dir ]]; then
        dir=$(cd -- "$dir" && pwd -P)
        cleanup_dir "$dir"
    else
        cleanup_prefix "$PREFIX"
    fi
    log "down: prefix cleanup done"
}

disable_bridge_netfilter() {
    local k f
    for k in iptables ip6tables arptables; do
        f=/proc/sys/net/bridge/bridge-nf-call-$k
        if [[ -w $f ]]; then
            echo 0 >"$f" 2>/dev/null || log "warning: could not set net.bridge.bridge-nf-call-$k=0"
        fi
    done
}

UP_DIR=""
on_up_exit() {
    local rc=$?
    trap - EXIT
    if [[ $rc -ne 0 && -n $UP_DIR ]]; then
        log "up failed (exit $rc); cleaning up"
        cleanup_dir "$UP_DIR" || true
    fi
    exit "$rc"
}

dump_sshd_log() {
    local nd=$1
    echo "---- $nd/sshd.log ----" >&2
    cat "$nd/sshd.log" >&2 2>/dev/null || echo "(no log)" >&2
    echo "----" >&2
}

cmd_up() {
    [[ $# -eq 2 ]] || { usage >&2; exit 2; }
    check_deps
    check_prefix "$PREFIX"
    local n=$1 dir
    if ! [[ $n =~ ^[0-9]+$ ]] || ((10#$n < 1 || 10#$n > 253)); then
        die "N must be 1..253, got '$n'"
    fi
    n=$((10#$n))
    [[ $SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] ||
        die "DSM_NETNS_SUBNET must look like 10.77.0, got '$SUBNET'"
    ((${#PREFIX} + 2 <= 15 && ${#PREFIX} + 1 + ${#n} <= 15)) ||
        die "prefix '$PREFIX' too long: interface names would exceed 15 chars"
    dir=$(abs_dir "$2")

    # Leftovers from earlier runs (this DIR's and this prefix's).
    cleanup_dir "$dir"
    cleanup_prefix "$PREFIX"

    UP_DIR=$dir
    trap on_up_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    rm -rf -- "$dir"/node[0-9]*
    rm -f -- "$dir"/{hosts,namespaces,ssh_command,id_ed25519,id_ed25519.pub,authorized_keys}
    echo "$PREFIX" >"$dir/prefix"

    local br="${PREFIX}br" gw="$SUBNET.1"
    local conflict
    conflict=$(ip -o -4 addr show 2>/dev/null | awk -v s="$SUBNET." 'index($4, s) == 1 {print $2}' | head -n1)
    [[ -z $conflict ]] || die "subnet $SUBNET.0/24 already used on interface '$conflict' (set DSM_NETNS_SUBNET)"

    disable_bridge_netfilter

    # Bridge in the root namespace.
    ip link add "$br" type bridge
    ip addr add "$gw/24" dev "$br"
    ip link set "$br" up

    local i ns ip hosts=() names=()
    for ((i = 1; i <= n; i++)); do
        ns="$PREFIX$i"
        ip="$SUBNET.$((i + 1))"
        ip netns add "$ns"
        ip link add "${PREFIX}v$i" type veth peer name "${PREFIX}p$i"
        ip link set "${PREFIX}p$i" netns "$ns"
        ip -n "$ns" link set "${PREFIX}p$i" name eth0
        ip -n "$ns" addr add "$ip/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        ip link set "${PREFIX}v$i" master "$br"
        ip link set "${PREFIX}v$i" up
        hosts+=("$ip")
        names+=("$ns")
    done

    # Keys.
    ssh-keygen -q -t ed25519 -N '' -C "netns-cluster-$PREFIX" -f "$dir/id_ed25519"
    cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
    chmod 600 "$dir/id_ed25519" "$dir/authorized_keys"

    mkdir -p /run/sshd
    chmod 755 /run/sshd

    local nd
    for ((i = 1; i <= n; i++)); do
        nd="$dir/node$i"
        mkdir -p "$nd"
        ssh-keygen -q -t ed25519 -N '' -C "host-$PREFIX$i" -f "$nd/ssh_host_ed25519_key"
        cat >"$nd/sshd_config" <<EOF
# generated by netns-cluster.sh for $PREFIX$i
ListenAddress ${hosts[i - 1]}:22
HostKey $nd/ssh_host_ed25519_key
PidFile $nd/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
UseDNS no
MaxStartups 200
MaxSessions 200
Subsystem sftp internal-sftp
EOF
        : >"$nd/sshd.log"
        if ! "$SSHD" -t -f "$nd/sshd_config" 2>"$nd/sshd.log"; then
            dump_sshd_log "$nd"
            die "sshd config test failed for ${names[i - 1]}"
        fi
        # shellcheck disable=SC2016 # positional args expand in the inner sh
        ip netns exec "${names[i - 1]}" unshare --uts sh -c \
            'hostname "$1" 2>/dev/null || echo "$1" >/proc/sys/kernel/hostname; exec "$2" -f "$3" -E "$4"' \
            sh "${names[i - 1]}" "$SSHD" "$nd/sshd_config" "$nd/sshd.log"
    done

    printf '%s\n' "${hosts[@]}" >"$dir/hosts"
    printf '%s\n' "${names[@]}" >"$dir/namespaces"
    local sshcmd=(ssh -i "$dir/id_ed25519" -o IdentitiesOnly=yes -o StrictHostKeyChecking=no
        -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes -o ConnectTimeout=5)
    echo "${sshcmd[*]}" >"$dir/ssh_command"

    # Wait until every host accepts "ssh root@IP true" (one shared deadline).
    local deadline=$((SECONDS + WAIT_SECS)) pid
    for ((i = 1; i <= n; i++)); do
        nd="$dir/node$i"
        until "${sshcmd[@]}" -o ConnectTimeout=2 "root@${hosts[i - 1]}" true </dev/null 2>/dev/null; do
            pid=$(head -n1 "$nd/sshd.pid" 2>/dev/null || true)
            if [[ -n $pid ]] && ! alive "$pid"; then
                dump_sshd_log "$nd"
                die "sshd for ${names[i - 1]} (pid $pid) died"
            fi
            if ((SECONDS >= deadline)); then
                dump_sshd_log "$nd"
                "${sshcmd[@]}" "root@${hosts[i - 1]}" true </dev/null || true
                die "ssh root@${hosts[i - 1]} (${names[i - 1]}) not up after ${WAIT_SECS}s"
            fi
            sleep 0.1
        done
    done

    # Cross-namespace TCP: from namespace 1 to host 2, through the bridge.
    if ((n >= 2)); then
        local got
        got=$(ip netns exec "${names[0]}" "${sshcmd[@]}" "root@${hosts[1]}" hostname </dev/null) ||
            die "cross-namespace ssh ${names[0]} -> ${hosts[1]} failed (bridge filtered?)"
        [[ $got == "${names[1]}" ]] ||
            die "cross-namespace ssh ${names[0]} -> ${hosts[1]}: hostname '$got', expected '${names[1]}'"
    fi

    UP_DIR=""
    trap - EXIT INT TERM
    echo "netns-cluster: up: $n host(s) ${hosts[0]}..${hosts[n - 1]} (${names[0]}..${names[n - 1]}) bridge $br $gw; ssh: $(cat "$dir/ssh_command") root@IP; files in $dir"
}

main() {
    case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down "$@" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
    esac
}

main "$@"
