"""Prometheus metrics; names are dispatch_* with units in the name."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS_OPEN = Gauge("dispatch_connections_open", "Terminal connections open now", ["protocol"])
CONNECTIONS = Counter("dispatch_connections_total", "Terminal connections accepted", ["protocol"])
FRAMES = Counter(
    "dispatch_frames_received_total", "Frames decoded, by event type", ["protocol", "type"]
)
DECODE_ERRORS = Counter(
    "dispatch_decode_errors_total", "Bytes or frames rejected by a decoder", ["protocol", "reason"]
)
REJECTS = Counter(
    "dispatch_frames_rejected_total",
    "Decoded frames refused by the gateway",
    ["protocol", "reason"],
)
SESSIONS_ONLINE = Gauge("dispatch_sessions_online", "Devices currently online")
SOS_ACK_SECONDS = Histogram(
    "dispatch_sos_ack_latency_seconds",
    "Time from an SOS frame's arrival to its ack being written",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SOS_TOTAL = Counter("dispatch_sos_frames_total", "SOS frames by result", ["result"])
FLUSH_ROWS = Counter("dispatch_live_flush_rows_total", "Device rows written by live-state flushes")
FLUSH_SECONDS = Histogram(
    "dispatch_live_flush_duration_seconds", "Duration of one live-state flush"
)
DB_ERRORS = Counter("dispatch_db_errors_total", "Database operations that failed", ["op"])

INCIDENTS_OPEN = Gauge("dispatch_incidents_open", "Unresolved incidents by kind", ["kind"])
ATTEMPTS = Counter(
    "dispatch_escalation_attempts_total",
    "Notification attempts by tier and outcome",
    ["tier", "outcome"],
)
FIRST_NOTIFICATION_SECONDS = Histogram(
    "dispatch_escalation_first_notification_seconds",
    "Time from an incident's creation to each notification being dispatched",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 60, 120, 300, 600),
)
ACCEPTANCE_SECONDS = Histogram(
    "dispatch_escalation_acceptance_seconds",
    "Time from an incident's creation to a human accepting it",
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
ESCALATION_LATE = Counter(
    "dispatch_escalation_late_steps_total", "Escalation steps that fired late (after downtime)"
)
CALLBACKS = Counter("dispatch_callbacks_total", "Responder callbacks by result", ["result"])

CARE_ROUNDS = Counter("dispatch_care_rounds_total", "Care rounds by what happened", ["result"])
CARE_LAG_SECONDS = Histogram(
    "dispatch_care_scheduler_lag_seconds",
    "How late the care scheduler acted on a round (timer fire minus due time)",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300),
)
GC_PAUSE_SECONDS = Histogram(
    "dispatch_gc_pause_seconds",
    "Garbage-collector passes by generation (the reactor stops for each)",
    ["generation"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
GC_FROZEN_OBJECTS = Gauge(
    "dispatch_gc_frozen_objects", "Objects moved out of the collector's passes by gc.freeze"
)
