"""The OpenAPI 3.1 document served at /api/v1/openapi.json."""

from __future__ import annotations

from functools import cache
from typing import Any

from dispatch.districts import DISTRICTS
from dispatch.http import validate


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "400": _json(_ref("Error"), "Invalid request (body, query or field values)"),
    "401": _json(_ref("Error"), "Missing, unknown or revoked token"),
    "403": _json(_ref("Error"), "The token's role may not do this"),
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {"type": "string", "description": "stable machine-readable code"},
            "detail": {"type": "string", "description": "a sentence for humans"},
            "fields": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "Contact": {
        "type": "object",
        "required": ["name", "phone"],
        "properties": {
            "name": {"type": "string"},
            "phone": {"type": "string"},
            "relation": {"type": "string"},
            "tier": {"type": "string", "enum": list(validate.TIERS), "default": "family"},
        },
    },
    "DeviceBinding": {
        "type": "object",
        "required": ["protocol", "ident"],
        "properties": {
            "protocol": {"type": "string", "enum": list(validate.PROTOCOLS)},
            "ident": {"type": "string", "description": "IMEI (gt06), phone (jt808), id (native)"},
        },
    },
    "SubscriberInput": {
        "type": "object",
        "required": ["name", "district", "address"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "district": {"type": "string", "enum": list(DISTRICTS)},
            "address": {"type": "string"},
            "contacts": {
                "type": "array",
                "items": _ref("Contact"),
                "description": "in calling order",
            },
            "device": _ref("DeviceBinding"),
            "phone": {"type": "string"},
            "id_number": {"type": "string", "description": "18 characters, check digit verified"},
            "township": {"type": "string"},
            "village": {"type": "string"},
            "living_situation": {"type": "string", "enum": list(validate.LIVING)},
            "health": {"type": "string", "enum": list(validate.HEALTH)},
            "disability_type": {"type": "string", "enum": list(validate.DISABILITY)},
            "notes": {"type": "string"},
        },
    },
    "Subscriber": {
        "allOf": [
            _ref("SubscriberInput"),
            {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "status": {"type": "string", "enum": ["active", "deregistered"]},
                    "deregistered_at": {"type": ["string", "null"], "format": "date-time"},
                    "deregistration_reason": {"type": ["string", "null"]},
                    "created_at": {"type": "string", "format": "date-time"},
                    "updated_at": {"type": "string", "format": "date-time"},
                },
            },
        ]
    },
    "Device": {
        "type": "object",
        "properties": {
            "ident": {"type": "string"},
            "protocol": {"type": "string"},
            "subscriber_id": {"type": ["integer", "null"]},
            "online": {"type": "boolean"},
            "last_seen": {"type": ["string", "null"], "format": "date-time"},
            "battery": {"type": ["integer", "null"], "description": "percent"},
            "signal": {"type": ["integer", "null"], "description": "percent"},
            "charging": {"type": ["boolean", "null"]},
            "firmware": {"type": ["string", "null"]},
            "location": {"type": ["object", "null"]},
        },
    },
    "TimelineEntry": {
        "type": "object",
        "properties": {
            "at": {"type": "string", "format": "date-time"},
            "action": {"type": "string", "description": "alarm, alarm_repeat, ..."},
            "tier": {
                "type": ["string", "null"],
                "enum": ["family", "community", "relay_110", "relay_120", "operator", None],
            },
            "target": {"type": ["string", "null"]},
            "channel": {"type": ["string", "null"]},
            "outcome": {"type": ["string", "null"]},
            "actor": {"type": ["string", "null"]},
            "detail": {"type": ["object", "null"]},
        },
    },
    "Incident": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "kind": {
                "type": "string",
                "enum": ["sos", "fall", "care_missed", "offline", "low_battery"],
            },
            "status": {"type": "string", "enum": ["open", "acknowledged", "resolved"]},
            "priority": {"type": "integer", "description": "1 most urgent"},
            "subscriber_id": {"type": ["integer", "null"]},
            "device_ident": {"type": ["string", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
            "location": {"type": ["object", "null"]},
            "timeline": {"type": "array", "items": _ref("TimelineEntry")},
        },
    },
}


def _op(summary: str, ok: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": {**ok, **ERRORS}, **extra}


def _q(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _p(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


PAGING = [
    _q("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
    _q("offset", {"type": "integer", "minimum": 0, "default": 0}),
]
NOT_FOUND = {"404": _json(_ref("Error"), "No such object")}


def _incident_actions() -> dict[str, Any]:
    conflict = {"409": _json(_ref("Error"), "conflicts with the incident's state"), **NOT_FOUND}
    iid = [_p("id", {"type": "integer"})]
    body = {
        "resolve": {
            "type": "object",
            "required": ["outcome"],
            "properties": {
                "outcome": {
                    "type": "string",
                    "enum": [
                        "false_alarm",
                        "helped_by_family",
                        "community_visit",
                        "ambulance",
                        "police",
                        "other",
                    ],
                }
            },
        },
        "notes": {
            "type": "object",
            "required": ["text"],
            "properties": {"text": {"type": "string"}},
        },
    }
    out: dict[str, Any] = {}
    for action, summary in (
        ("claim", "Take the incident (409 if another operator has it)"),
        ("acknowledge", "A human is on it: stops the escalation"),
        ("resolve", "Close with an outcome"),
        ("notes", "Add a note to the timeline"),
        ("relay/confirm", "Send the pending 110/120 relay now"),
        ("relay/skip", "Do not relay; continue with the next step"),
    ):
        op = _op(summary, {"200": {"description": "done"}, **conflict}, parameters=iid)
        if action in body:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": body[action]}},
            }
        out[f"/api/v1/incidents/{{id}}/{action}"] = {"post": op}
    return out


@cache
def openapi_document() -> dict[str, Any]:
    """Build (once) the OpenAPI document."""
    sub_id = [_p("id", {"type": "integer"})]
    paths = {
        "/healthz": {
            "get": {
                "summary": "Liveness; no auth",
                "security": [],
                "responses": {"200": {"description": "serving"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics; no auth",
                "security": [],
                "responses": {"200": {"description": "text format"}},
            }
        },
        "/api/v1/subscribers": {
            "post": _op(
                "Enroll a subscriber (roles admin, district)",
                {
                    "201": _json(_ref("Subscriber"), "created"),
                    "409": _json(_ref("Error"), "device ident bound to someone else"),
                },
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SubscriberInput")}},
                },
            ),
            "get": _op(
                "List subscribers (district tokens see their district only)",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "items": {"type": "array", "items": _ref("Subscriber")},
                                "total": {"type": "integer"},
                            },
                        },
                        "a page",
                    )
                },
                parameters=[
                    _q("district", {"type": "string"}),
                    _q("status", {"type": "string"}),
                    *PAGING,
                ],
            ),
        },
        "/api/v1/subscribers/{id}": {
            "get": _op(
                "One subscriber",
                {"200": _json(_ref("Subscriber"), "ok"), **NOT_FOUND},
                parameters=sub_id,
            ),
            "patch": _op(
                "Change fields; contacts replace the whole list; device rebinds",
                {
                    "200": _json(_ref("Subscriber"), "ok"),
                    **NOT_FOUND,
                    "409": _json(_ref("Error"), "de-registered, or device taken"),
                },
                parameters=sub_id,
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SubscriberInput")}},
                },
            ),
            "delete": _op(
                "De-register (moved, deceased, ...): the record is kept, the device freed",
                {
                    "200": _json(_ref("Subscriber"), "ok"),
                    **NOT_FOUND,
                    "409": _json(_ref("Error"), "already de-registered"),
                },
                parameters=sub_id,
                requestBody={
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["reason"],
                                "properties": {"reason": {"type": "string"}},
                            }
                        }
                    },
                },
            ),
        },
        "/api/v1/devices/{ident}": {
            "get": _op(
                "A terminal's live state",
                {"200": _json(_ref("Device"), "ok"), **NOT_FOUND},
                parameters=[_p("ident", {"type": "string"})],
            ),
        },
        "/api/v1/incidents": {
            "get": _op(
                "The live queue: open first, then by priority, oldest first",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {"items": {"type": "array", "items": _ref("Incident")}},
                        },
                        "a page",
                    )
                },
                parameters=[
                    _q("status", {"type": "string", "enum": ["open", "acknowledged", "resolved"]}),
                    *PAGING,
                ],
            ),
        },
        "/api/v1/incidents/{id}": {
            "get": _op(
                "One incident with its whole timeline",
                {"200": _json(_ref("Incident"), "ok"), **NOT_FOUND},
                parameters=[_p("id", {"type": "integer"})],
            ),
        },
        "/api/v1/openapi.json": {"get": _op("This document", {"200": {"description": "ok"}})},
        "/api/v1/incidents/stream": {
            "get": _op(
                "Server-Sent Events: one `incident` event per queue change "
                "(data: {type, id, what}); a comment every 15 s keeps it open",
                {
                    "200": {
                        "description": "text/event-stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    }
                },
            )
        },
        **_incident_actions(),
        "/api/v1/callbacks/{attempt}": {
            "post": {
                "summary": "A responder's answer, signed with the webhook secret "
                "(X-Dispatch-Timestamp, X-Dispatch-Signature); see docs/channels.md",
                "security": [],
                "parameters": [_p("attempt", {"type": "string"})],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["answer"],
                                "properties": {
                                    "answer": {"type": "string", "enum": ["accept", "decline"]},
                                    "responder": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": {"description": "applied"},
                    "401": _json(_ref("Error"), "bad or stale signature"),
                    "404": _json(_ref("Error"), "unknown attempt"),
                    "409": _json(_ref("Error"), "already answered or incident closed"),
                },
            }
        },
        "/api/v1/policies": {
            "get": _op(
                "Escalation policies (active; ?all=1 for every version)",
                {"200": {"description": "ok"}},
            ),
            "post": _op(
                "Save a new version of a policy (admin); refused if invalid",
                {"201": {"description": "saved"}},
                requestBody={
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["name", "document"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "scope": {
                                        "type": "string",
                                        "enum": ["global", "district", "subscriber"],
                                    },
                                    "district": {"type": "string"},
                                    "subscriber_id": {"type": "integer"},
                                    "document": {"type": "object"},
                                },
                            }
                        }
                    },
                },
            ),
        },
        "/api/v1/policies/{id}": {
            "get": _op(
                "One policy version",
                {"200": {"description": "ok"}, **NOT_FOUND},
                parameters=[_p("id", {"type": "integer"})],
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dispatch",
            "version": "1",
            "description": "One-button emergency-call dispatch. Errors are "
            "{error, detail} JSON with a 4xx status.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "dispatch token create --role ROLE",
                }
            },
        },
    }
