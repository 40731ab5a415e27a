"""Sample data shared by the tests: the examples of the API reference page, and settings
holding every kind of secret."""

import base64
from pathlib import Path

from notifier.config import Settings, load_settings

COMPLETED = {
    "id": "6f82a2d8-a6d4-4e8a-a0fa-e8b09823a2d8",
    "reference_id": "batch-2026-04",
    "status": "completed",
    "created_at": "2026-03-30T11:00:00Z",
    "started_at": "2026-03-30T11:00:04Z",
    "finished_at": "2026-03-30T11:01:09Z",
    "output_url": "https://storage.chamelaion.com/output/6f82a2d8.mp4",
}
QUEUED = {
    "id": "a1b2c3d4-e5f6-7890-abcd-ef1234567890",
    "reference_id": "batch-2026-04",
    "status": "queued",
    "created_at": "2026-03-30T11:02:00Z",
}
# The error messages of the API reference page, in its order.
API_ERROR_MESSAGES = (
    "missing authorization header",
    "invalid authorization format",
    "missing token",
    "invalid token",
    "unauthorized",
    "rate limit exceeded",
    "internal error",
)
AUTH_ERROR_MESSAGES = API_ERROR_MESSAGES[:5]
# When a sample transition was detected: 2026-03-30T11:01:10.250Z, in unix milliseconds.
DETECTED_MS = 1_774_868_470_250
# The key the test simulator accepts: distinctive, so tests can assert it never leaks.
SIMULATOR_KEY = "sk-ZZLEAK-simulator-key-4f1c"

# Settings with every kind of secret, each holding ZZLEAK so tests can search for it.
API_KEY = "sk-live-ZZLEAK-api-key-0042"
REDIS_PASSWORD = "ZZLEAK-redis-password"  # noqa: S105 - a test value, not a secret
REDIS_URL = f"redis://notifier:{REDIS_PASSWORD}@redis.internal:6379/2"
SLACK_PATH = "/services/T0TEAM/B0HOOK/ZZLEAKslacktoken"
SLACK_URL = f"https://hooks.slack.com{SLACK_PATH}"
WEBHOOK_URL = "https://receiver.example/notifier-hook"
# Two signing secrets, as during a rotation: each is blanked on its own.
OLD_SECRET = "whsec_" + base64.b64encode(b"ZZLEAK-old-signing-key").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"ZZLEAK-new-signing-key").decode()
OPS_URL = "https://ops.example/hooks/ZZLEAK-ops-path?token=ZZLEAK-query"
OPS_SECRET = "whsec_" + base64.b64encode(b"ZZLEAK-ops-signing-key").decode()
OPS_HEADER = "Bearer ZZLEAK-header-value"
ROUTES_TOML = f"""
[[routes]]
name = "ops"
type = "webhook"
url = "{OPS_URL}"
secret = "{OPS_SECRET}"
headers = {{ "Authorization" = "{OPS_HEADER}" }}
"""


def settings_full_of_secrets(directory: Path) -> Settings:
    """Every kind of secret: API key, Redis URL with a password, Slack URL, two webhook
    secrets, and a TOML route (written to `directory`) with its own URL, secret and header."""
    config = directory / "notifier.toml"
    config.write_text(ROUTES_TOML)
    return load_settings(
        {
            "config": str(config),
            "api_key": API_KEY,
            "redis_url": REDIS_URL,
            "slack_webhook_url": SLACK_URL,
            "webhook_url": WEBHOOK_URL,
            "webhook_secret": f"{OLD_SECRET} {NEW_SECRET}",
        }
    )
