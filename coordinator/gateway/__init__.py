"""The gateway role: gRPC servicers and the HTTP port; translate, authenticate, delegate."""
