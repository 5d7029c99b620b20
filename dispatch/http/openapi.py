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
