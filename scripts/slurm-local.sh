#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for trying profiles/slurm end to end
# (tests/test_slurm.py). Run as root; see `scripts/slurm-local.sh -h`.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/cldf-slurm-local}"
CLUSTER="cldflocal"
PARTITION="local"
ACCOUNT="local"
CTLD_PORT=16817
SLURMD_PORT=16818
DBD_PORT=16819
DB_PORT=16306
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
MARKER=".cldf-slurm-local"
# Inside a job, snakemake-executor-plugin-slurm-jobstep starts the rule with `srun` in an environment
# stripped of every SLURM_* variable, SLURM_CONF included: srun then only finds the cluster through
# the default path. So start links it to this cluster's slurm.conf (when no other SLURM is configured
# there) and stop removes the link.
ETC_CONF=/etc/slurm/slurm.conf
WAIT_S="${SLURM_LOCAL_WAIT_S:-90}"

usage() {
    cat <<EOF
Usage: scripts/slurm-local.sh [start|stop|status|env] [-h]

Bring up (start, the default) or tear down (stop) a real single-node SLURM cluster on this
machine: munged, MariaDB, slurmdbd, slurmctld and slurmd, configured for localhost in
$DIR (set SLURM_LOCAL_DIR to use another folder).

  start    install Debian's slurm-wlm, slurmdbd, munge and mariadb-server if missing (apt-get),
           write a munge key, slurm.conf and slurmdbd.conf (one node with this machine's CPUs
           and memory, one partition '$PARTITION', account '$ACCOUNT' for the current user),
           start the daemons and wait until sinfo shows the node idle. Starting a cluster that
           is already up does nothing. Prints the lines that 'env' prints.
           Links $ETC_CONF to that slurm.conf (and refuses to start when another
           $ETC_CONF exists): inside a job, snakemake's jobstep runs srun without SLURM_CONF.
  stop     cancel the cluster's jobs, stop every daemon it started, remove the link and $DIR.
           Stopping a cluster that is not running does nothing.
  status   sinfo and squeue of the cluster (exit 1 when it is not up; says so when a start was
           never stopped and $ETC_CONF still links to the cluster that is gone).
  env      the shell lines that point SLURM's commands at this cluster:
               eval "\$(scripts/slurm-local.sh env)"
           (SLURM_CONF; SLURM_LOCAL_PARTITION and SLURM_LOCAL_ACCOUNT for --default-resources).

Job accounting: snakemake-executor-plugin-slurm asks 'sacct' for job states and checks the
account with 'sacctmgr', so the cluster runs slurmdbd on a private MariaDB server (data in
$DIR/mysql, TCP 127.0.0.1:$DB_PORT). Needs root (the daemons run as root; jobs run as root).
Ports: slurmctld $CTLD_PORT, slurmd $SLURMD_PORT, slurmdbd $DBD_PORT, MariaDB $DB_PORT.
EOF
}

die() { echo "slurm-local: error: $*" >&2; exit 1; }
say() { echo "slurm-local: $*" >&2; }

env_lines() {
    echo "export SLURM_CONF=$DIR/etc/slurm.conf"
    echo "export SLURM_LOCAL_PARTITION=$PARTITION"
    echo "export SLURM_LOCAL_ACCOUNT=$ACCOUNT"
}

export SLURM_CONF="$DIR/etc/slurm.conf"

# --- processes, by the pid files this script wrote ------------------------------------------------
DAEMONS=(slurmctld slurmd slurmdbd mariadbd munged)   # stop order

pid_of() {  # the pid in $DIR/run/$1.pid if that process is alive
    local f="$DIR/run/$1.pid" pid
    [[ -s $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

stop_daemon() {
    local name=$1 pid i
    pid=$(pid_of "$name") || { rm -f "$DIR/run/$name.pid"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) did not stop within 20 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$DIR/run/$name.pid"
}

cluster_up() {  # every daemon alive and the node idle or allocated
    local d
    for d in "${DAEMONS[@]}"; do pid_of "$d" >/dev/null || return 1; done
    [[ $(sinfo -h -N -o %T 2>/dev/null | head -1) =~ ^(idle|mixed|allocated|completing)$ ]]
}

wait_for() {  # wait_for DESCRIPTION COMMAND...: retry COMMAND (10 s each try) for up to $WAIT_S seconds
    local what=$1 deadline=$((SECONDS + WAIT_S))
    shift
    while ((SECONDS < deadline)); do
        timeout 10 "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "$what did not come up within $WAIT_S s; logs in $DIR/log"
}

# --- stop ----------------------------------------------------------------------------------------
etc_conf_is_ours() {  # $ETC_CONF is the link start made (maybe dangling: $DIR gone)
    [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$DIR/etc/slurm.conf" ]]
}

unlink_etc_conf() {
    if etc_conf_is_ours; then
        rm -f "$ETC_CONF"
    fi
}

stop() {
    if [[ ! -d $DIR ]]; then
        unlink_etc_conf
        say "not running (no $DIR)"
        return 0
    fi
    [[ -e $DIR/$MARKER ]] || die "$DIR exists but was not made by this script (no $MARKER); not touching it"
    if pid_of slurmctld >/dev/null; then  # end the jobs first: slurmstepd would outlive slurmd
        scancel --partition "$PARTITION" 2>/dev/null || true
        local i
        for ((i = 0; i < 60; i++)); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    local d
    for d in "${DAEMONS[@]}"; do stop_daemon "$d"; done
    unlink_etc_conf
    rm -rf "$DIR"
    say "stopped; removed $DIR"
}

# --- start ---------------------------------------------------------------------------------------
install_packages() {
    local missing=() cmd
    for cmd in munged slurmctld slurmd slurmdbd sacct sacctmgr mariadbd mariadb-install-db; do
        command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 \
            || missing+=("$cmd")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # Keep the packages' maintainer scripts from starting the system-wide services.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
    fi
    local rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${PACKAGES[@]}" >/dev/null; } || rc=$?
    [[ $own_policy -eq 1 ]] && rm -f "$policy"
    [[ $rc -eq 0 ]] || die "apt-get install ${PACKAGES[*]} failed (exit $rc)"
}

write_configs() {
    local host node_line dbpass
    host=$(hostname -s)
    # The node exactly as slurmd sees this machine (CPUs, sockets, cores, threads, RealMemory).
    node_line=$(slurmd -C | grep -m1 '^NodeName=') || die "slurmd -C failed"
    node_line=$(sed -E "s/^NodeName=[^ ]+/NodeName=$host/" <<<"$node_line")
    dbpass=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
    cat >"$DIR/etc/slurm.conf" <<EOF
# Written by scripts/slurm-local.sh: a single-node cluster on this machine.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups: plain process tracking works in containers and VMs alike.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Job accounting through slurmdbd: what sacct (job states) and sacctmgr (accounts) read.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$DIR/munge/munge.socket
AccountingStorageEnforce=associations
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
# (sacct --format=...,Comment shows the rule of each snakemake job)
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
MailProg=/bin/true
MinJobAge=300
InactiveLimit=0
KillWait=30
Waittime=0
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/etc/slurmdbd.conf" <<EOF
# Written by scripts/slurm-local.sh.
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"
    echo "$dbpass" >"$DIR/etc/dbpass"
    chmod 600 "$DIR/etc/dbpass"
}

start_munge() {
    head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
    chmod 400 "$DIR/munge/munge.key"
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for munged munge -S "$DIR/munge/munge.socket" -n
}

MYSQL_ROOT=(mariadb --no-defaults --socket="$DIR/run/mysqld.sock" -uroot)

start_mariadb() {
    mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=normal \
        --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 \
        || die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
    # Small buffers: the accounting database of a test cluster holds a few hundred rows.
    setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mysqld.sock" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadbd.pid" \
        --log-error="$DIR/log/mariadb.log" --skip-log-bin --innodb-buffer-pool-size=128M \
        --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 --innodb-use-native-aio=0 \
        </dev/null >/dev/null 2>&1 &
    wait_for MariaDB "${MYSQL_ROOT[@]}" -e 'SELECT 1'
    wait_for "MariaDB's pid file" test -s "$DIR/run/mariadbd.pid"
    "${MYSQL_ROOT[@]}" -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$DIR/etc/dbpass")';
                   CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$(cat "$DIR/etc/dbpass")';
                   GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
                   GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (the SLURM daemons run as root and apt-get installs them)"
    export PATH="$PATH:/usr/sbin:/sbin"
    if [[ -d $DIR ]]; then
        if [[ -e $DIR/$MARKER ]] && cluster_up; then
            say "already running"
            env_lines
            return 0
        fi
        say "a partly running or stale cluster in $DIR: stopping it first"
        stop
    fi
    if [[ -e $ETC_CONF || -L $ETC_CONF ]] && [[ $(readlink "$ETC_CONF" || true) != "$DIR/etc/slurm.conf" ]]; then
        die "$ETC_CONF exists: this machine has a SLURM of its own; not starting a second one beside it"
    fi
    install_packages
    mkdir -p "$DIR"
    touch "$DIR/$MARKER"
    mkdir -p "$DIR"/{etc,munge,mysql,log,run,spool/ctld,spool/d}
    chmod 700 "$DIR/etc"
    chmod 755 "$DIR/munge"  # munged: clients need to reach the socket; the key itself is mode 400
    # From here on, a failure leaves no half-started cluster behind.
    trap 'rc=$?; if [[ $rc -ne 0 ]]; then say "start failed; logs:"; tail -n 5 "$DIR"/log/*.log >&2 || true
          if [[ -n ${SLURM_LOCAL_KEEP:-} ]]; then say "SLURM_LOCAL_KEEP set: left as it is"; else stop; fi; fi' EXIT
    write_configs
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -sfn "$DIR/etc/slurm.conf" "$ETC_CONF"
    start_munge
    start_mariadb
    slurmdbd
    wait_for slurmdbd sacctmgr -n list cluster
    local user
    user=$(id -un)
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="local test account" Organization=cldf >/dev/null
    sacctmgr -i add user "$user" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
    if [[ -n ${SUDO_USER:-} && $SUDO_USER != "$user" ]]; then
        sacctmgr -i add user "$SUDO_USER" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
    fi
    slurmctld
    wait_for slurmctld scontrol ping
    slurmd
    wait_for "the node (idle in sinfo)" bash -c '[[ $(sinfo -h -N -o %T) == idle ]]'
    trap - EXIT
    say "up: node $(hostname -s) ($(sinfo -h -N -o '%c CPUs, %m MB')), partition $PARTITION, account $ACCOUNT"
    env_lines
}

status() {
    if [[ -e $DIR/$MARKER ]] && cluster_up; then
        sinfo
        squeue
    elif etc_conf_is_ours; then
        say "not running, but $ETC_CONF still links to it (a start whose stop never came): every SLURM" \
            "command, scontrol at each snakemake start included, waits for a controller that is gone;" \
            "'$0 stop' removes the link and $DIR"
        return 1
    else
        say "not running"
        return 1
    fi
}

case "${1:-start}" in
    -h | --help | help) usage ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) env_lines ;;
    *) usage >&2; exit 2 ;;
esac
