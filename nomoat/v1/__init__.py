"""Generated gRPC modules for the nomoat.v1 protocol (see proto/nomoat/v1)."""
