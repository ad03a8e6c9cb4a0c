#!/usr/bin/env bash
# Preflight: is the broker up, ready, and answering over mTLS?
source "$(dirname "$0")/lib.sh"
curl -fsS "http://$JB_OPS/healthz"
curl -fsS "http://$JB_OPS/readyz"
grpcurl -plaintext "$JB_OPS" grpc.health.v1.Health/Check
as operator "$JB_ADDR" grpc.health.v1.Health/Check
as operator "$JB_ADDR" list
