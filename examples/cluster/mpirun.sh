#!/bin/bash
# distval under Open MPI: 2 parameter servers and 4 workers on the hosts of
# ./hostfile (one "host slots=N" per line), started with one command line.
#
#   examples/cluster/mpirun.sh
#
# Ranks 0 and 1 serve, ranks 2..5 train (distval-rank --num-ps 2 reads
# OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE). RENDEZVOUS must be a
# directory every host sees (NFS home, Lustre, ...), fresh for each job.
# MPICH's mpiexec works the same way (PMI_RANK / PMI_SIZE).
set -euo pipefail

RENDEZVOUS="${RENDEZVOUS:-$HOME/.distval/rendezvous/mpirun-$(date +%Y%m%d-%H%M%S)-$$}"
mkdir -p "$RENDEZVOUS"

mpirun -np 6 --hostfile "${HOSTFILE:-hostfile}" --map-by node \
  -x PATH -x LD_LIBRARY_PATH \
  distval-rank --num-ps 2 --rendezvous "$RENDEZVOUS" '--ps-arg=--bind=tcp://*:0' \
    -- distval-worker --model mlp --epochs 5
