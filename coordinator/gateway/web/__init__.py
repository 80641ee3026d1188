"""The coordinator's HTTP port: a read-only dashboard (coordinator/gateway/web/static/), its JSON API and
live stream, and Prometheus' ``/metrics``. See :mod:`coordinator.gateway.web.server`."""
