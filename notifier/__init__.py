"""chamelaion-notifier: tells Slack and HTTP webhooks when a Chamelaion lip sync request finishes.

Importing the package stays cheap on purpose: commands import what they need.
"""

__version__ = "0.1.0"

USER_AGENT = f"chamelaion-notifier/{__version__}"
