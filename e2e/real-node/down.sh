#!/usr/bin/env bash
# Stop the real-node cluster of e2e/real-node/up.sh and remove everything it made: processes
# (components, shims, containers), the kubelet's cgroup tree, the node's mount namespace, the
# network namespace, and .cache/real-node/ (PRISM_KEEP_LOGS=1 keeps logs/).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ "$(id -u)" = 0 ] || { echo "real-node/down.sh: needs root" >&2; exit 1; }
cluster_lock

cg_dirs() { for c in /sys/fs/cgroup/*/; do [ -d "$c${CGROUP_ROOT#/}" ] && echo "$c${CGROUP_ROOT#/}"; done; }
cg_pids() { local d; for d in $(cg_dirs); do find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null; done | sort -u; }

# 1. node agents first, so nothing restarts the containers
for c in kube-proxy kubelet; do stop_component "$c" 10; done

# 2. containers: every process in the kubelet's cgroup tree
for _ in $(seq 20); do
  pids="$(cg_pids)"; [ -z "$pids" ] && break
  kill -KILL $pids 2>/dev/null; sleep 0.2
done
[ -z "$(cg_pids)" ] || log "warning: processes left in cgroup $CGROUP_ROOT: $(cg_pids | tr '\n' ' ')"

# 3. containerd and the control plane, then whatever else lives in the node's mount namespace
# (the containerd shims)
for c in containerd kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_component "$c" 10; done
if anchor="$(anchor_pid)"; then
  mnt="$(readlink "/proc/$anchor/ns/mnt")"
  for p in /proc/[0-9]*; do
    p="${p#/proc/}"
    [ "$p" = "$anchor" ] && continue
    [ "$(readlink "/proc/$p/ns/mnt" 2>/dev/null)" = "$mnt" ] && kill -KILL "$p" 2>/dev/null
  done
fi

# 4. the anchor (its mount namespace, with every overlay/tmpfs mount of the node, goes with it)
if anchor="$(anchor_pid)"; then kill -KILL "$anchor" 2>/dev/null; fi
rm -f "$D/pids/anchor.pid"

# 5. the host's kernel tunables the kubelet changed (saved by up.sh)
if [ -f "$D/host-sysctls" ]; then
  while read -r k v; do [ -n "$k" ] && echo "$v" > "/proc/sys/$k"; done < "$D/host-sysctls"
fi

# 6. cgroups (bottom-up), netns, state
for d in $(cg_dirs); do find "$d" -depth -type d -exec rmdir {} + 2>/dev/null; done
[ -z "$(cg_dirs)" ] || log "warning: cgroup dirs left: $(cg_dirs | tr '\n' ' ')"
if ip netns list | grep -qw "$PRISM_REAL_NETNS"; then ip netns del "$PRISM_REAL_NETNS"; fi
# empty mount points up.sh created on the host for the node's private tmpfs dirs
if [ -f "$D/created-host-dirs" ]; then
  sort -r "$D/created-host-dirs" | while read -r p; do [ -n "$p" ] && rmdir "$p" 2>/dev/null; done
fi
# mounts of the node can only be left on the host if its mount namespace is still alive
if grep -q " $D" /proc/self/mounts; then
  grep " $D" /proc/self/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l
fi
if [ -d "$D" ]; then
  if [ "${PRISM_KEEP_LOGS:-0}" = 1 ]; then
    find "$D" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
  else
    rm -rf "$D"
  fi
fi
log "real-node cluster down"
