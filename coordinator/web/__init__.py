"""The coordinator's HTTP port: a read-only dashboard (coordinator/web/static/), its JSON API and
live stream, and Prometheus' ``/metrics``. See :mod:`coordinator.web.server`."""
