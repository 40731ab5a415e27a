"""The bundled templates: the default webhook template renders the contract's body."""

from __future__ import annotations

import json

from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from notifier.config import bundled_templates_dir
from notifier.models import Event, LipsyncRequest

from samples import COMPLETED, DETECTED_MS


def render(template: str, event: Event) -> str:
    environment = SandboxedEnvironment(
        loader=FileSystemLoader(bundled_templates_dir()), undefined=StrictUndefined
    )
    return environment.get_template(template).render(event.context())


def test_the_default_webhook_body_is_the_contract_body() -> None:
    request = LipsyncRequest.model_validate(COMPLETED)
    body = json.loads(render("webhook/default.json.j2", Event(request, "processing", DETECTED_MS)))
    assert body == {
        "type": "lipsync.request.completed",
        "timestamp": "2026-03-30T11:01:10Z",
        "data": {**COMPLETED, "previous_status": "processing", "error_message": None},
    }


def test_hostile_values_cannot_break_the_webhook_json() -> None:
    hostile = 'quote " backslash \\ newline \n <script>alert(1)</script> </ emoji 🎬 ' * 200
    request = LipsyncRequest.model_validate(
        {
            "id": 'id"},{"injected": true',
            "status": "failed",
            "created_at": "2026-03-30T11:00:00Z",
            "reference_id": hostile,
            "error_message": hostile,
        }
    )
    body = json.loads(render("webhook/default.json.j2", Event(request, None, DETECTED_MS)))
    assert body["data"]["error_message"] == hostile
    assert body["data"]["reference_id"] == hostile
    assert body["data"]["id"] == 'id"},{"injected": true'
    assert body["data"]["previous_status"] is None
    assert body["type"] == "lipsync.request.failed"
