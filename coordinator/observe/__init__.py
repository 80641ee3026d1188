"""Observe: status, volunteer contributions, the dashboard data and Prometheus metrics."""
