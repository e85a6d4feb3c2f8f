#!/bin/bash
# A Ray cluster for `vitok extract --engine ray`: decode on every node's CPUs (CPU-only nodes add decode capacity),
# encode on one actor per GPU, one store. Every node needs vitok (pip install 'vitok[ray]', the same version as the
# driver: the driver also ships its vitok to the workers) and the inputs at the same paths (a shared file system, or
# URLs); OUT is written by the driver alone (a folder on its node, a shared one, or s3://BUCKET/PREFIX).
#
#   head node (GPUs or not):   scripts/ray_cluster.sh head
#   each other node:           scripts/ray_cluster.sh worker HEAD_IP       (CPU-only nodes too)
#   then, on the head:         vitok extract /data/laion/{00000..01023}.tar -o /shared/out --engine ray --address auto
#
# Resubmit the same extract after a failure or preemption: committed shards are kept, the rest is redone (the driver
# holds the claims; a killed driver's claims are taken over by the next run, as a killed torchrun process's are).
# `ray stop` on every node ends the cluster.
#
# Kubernetes (KubeRay): a RayCluster whose head and worker groups run an image with vitok[ray] and mount the shared
# volume at the same path; submit the extract as a RayJob:
#   entrypoint: vitok extract /data/tars -o /shared/out --engine ray --address auto --model qwen3-vl-2b
# with a GPU worker group (nvidia.com/gpu: 1 per pod, or more) and a CPU-only worker group for decoding.
set -euo pipefail
role=${1:?usage: ray_cluster.sh head | worker HEAD_IP}
port=${RAY_PORT:-6379}
case "$role" in
  head)
    ray start --head --port "$port" --include-dashboard=false
    echo "workers join with: scripts/ray_cluster.sh worker $(hostname -I | awk '{print $1}')" ;;
  worker)
    head=${2:?usage: ray_cluster.sh worker HEAD_IP}
    ray start --address "$head:$port" ;;
  *)
    echo "usage: ray_cluster.sh head | worker HEAD_IP" >&2; exit 2 ;;
esac
