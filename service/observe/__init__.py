"""Observability: ids on log lines, structured logs, OpenTelemetry traces, and the live record of
sessions, calls and engine requests behind /metrics, /v1/observe and the dashboard."""
