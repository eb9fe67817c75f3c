#!/usr/bin/env bash
# Distributed (parameter server, kvstore dist_sync) training over processes or machines.
#
#   scripts/train_dist.sh NUM_WORKERS [mxmask train arguments]
#
# Environment:
#   NUM_SERVERS  parameter-server processes (default 1)
#   LAUNCHER     local (default: every process on this machine) or ssh (also mpi, sge, yarn)
#   HOSTFILE     the hosts of an ssh/mpi job, one per line ("host" or "host:sshport")
#   PYTHON       the interpreter (default: python on PATH, resolved to an absolute path)
#   MXMASK_DIST_TIMEOUT  seconds a worker waits in one gradient exchange before it decides
#                that another process died and exits non-zero (default 600; 0: wait forever)
#
# Each worker trains on its shard (kv.rank::kv.num_workers) of every global batch of
# solver.ims_per_batch images, which must be a multiple of NUM_WORKERS. Worker 0 writes the
# checkpoints in --out and evaluates at the end. --resume works as in scripts/train.sh.
#
# One machine, 2 workers and 1 server (e.g. to use 2 CPU sockets, or to test):
#   scripts/train_dist.sh 2 --out runs/dist --set solver.ims_per_batch=4
# The local launcher (python -m mxmask.engine.dist_launch) stops the whole job with a non-zero
# exit code as soon as one process fails; Ctrl-C stops everything too.
#
# Several machines, over ssh:
#   cat > hosts <<END
#   10.0.0.1
#   10.0.0.2:2222
#   END
#   LAUNCHER=ssh HOSTFILE=hosts NUM_SERVERS=2 scripts/train_dist.sh 4 \
#       --config mask_rcnn_r50_fpn --ctx gpu:0,1 --set solver.ims_per_batch=16 --out /shared/r50
# Requirements: passwordless ssh from this machine to every host; this repository and the
# same Python environment at the same absolute paths on every host (the remote command is
# "cd $PWD; $PYTHON -m mxmask train ..."); the dataset and --out on a file system that all
# hosts share (resuming reads the checkpoint on every worker). The scheduler runs here;
# servers and then workers are placed round-robin over the hosts. Train arguments must not
# contain spaces or single quotes with ssh (write --set input.min_size_train=[640,800]).
# ps-lite finds a host's address from its first non-loopback interface; set DMLC_INTERFACE
# (e.g. eth0) to choose another one. A worker that dies makes the others exit after
# MXMASK_DIST_TIMEOUT; leftover servers can be removed with
#   python "$(python -c 'import mxnet,os;print(os.path.dirname(mxnet.__file__))')/tools/kill-mxnet.py" hosts "$USER" 'mxmask train'
#
# (python -m mxnet.tools.launch cannot be used as is on Python >= 3.9: its tracker calls the
# removed Thread.isAlive, dies after starting the scheduler, and the job hangs; the module
# above restores it for the ssh/mpi/sge/yarn launchers and replaces the local one.)
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 NUM_WORKERS [mxmask train arguments]" >&2
    exit 2
fi
NUM_WORKERS=$1
shift
PY=$(command -v "${PYTHON:-python}") || { echo "$0: ${PYTHON:-python} not found" >&2; exit 2; }
ARGS=(-n "$NUM_WORKERS" -s "${NUM_SERVERS:-1}" --launcher "${LAUNCHER:-local}")
if [[ -n "${HOSTFILE:-}" ]]; then
    ARGS+=(-H "$HOSTFILE")
fi
exec "$PY" -m mxmask.engine.dist_launch "${ARGS[@]}" \
    "$PY" -m mxmask train --kvstore dist_sync "$@"
