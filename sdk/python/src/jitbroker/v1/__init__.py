"""Generated gRPC and protobuf stubs of ``proto/jitbroker/v1`` (grpcio-tools, mypy-protobuf).

Regenerate with ``scripts/test-python.sh --regen``; the test script fails when they drift."""
