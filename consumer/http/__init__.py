"""HTTP: /metrics, /healthz and /readyz, and the metrics themselves."""
