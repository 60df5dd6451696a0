#!/usr/bin/env bash
# Network prerequisites of a privatelink node (see docs/DATAPATH.md). Adapt before use.
set -euo pipefail
role="${1:?usage: node-network.sh node|provider-router NODE_PROVIDER_ADDR [NAT_RANGE]}"
node_addr="${2:?node address on the provider network}"
nat_range="${3:-198.19.128.0/20}"
case "$role" in
node)
    sysctl -w net.ipv4.ip_forward=1          # bpf_fib_lookup needs forwarding on
    sysctl -w net.ipv4.conf.all.rp_filter=0  # first packets of a flow pass through the kernel NATed
    ;;
provider-router)
    # Replies to NAT addresses must come back to the node that owns them.
    ip route replace "$nat_range" via "$node_addr"
    ;;
*) echo "unknown role $role" >&2; exit 2 ;;
esac
