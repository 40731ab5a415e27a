"""Sample API items shared by the tests: the examples of the API reference page."""

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
# When a sample transition was detected: 2026-03-30T11:01:10.250Z, in unix milliseconds.
DETECTED_MS = 1_774_868_470_250
# The key the test simulator accepts: distinctive, so tests can assert it never leaks.
SIMULATOR_KEY = "sk-ZZLEAK-simulator-key-4f1c"
