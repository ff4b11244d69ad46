"""Webhook deliveries of finished jobs: claimed by one worker at a time, retried with backoff, then given up.

The event is the same on every attempt and from every worker (as Stripe's webhooks): receivers deduplicate on
its id. How a delivery is made and what it may reach: webhooks.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

from .schema import iso
from .webhooks import DeliveryError

log = logging.getLogger("pilotys_whisper.jobs")

# A worker that claims a webhook delivery holds it this long (a delivery ends within WHISPER_WEBHOOK_TIMEOUT_S;
# the rest is room for recording the attempt); after that another worker may send it.
WEBHOOK_CLAIM_FACTOR = 2
WEBHOOK_CLAIM_MARGIN_S = 5


class Deliveries:
    def __init__(self, manager):
        self.manager = manager
        self.store, self.settings, self.policy = manager.store, manager.settings, manager.policy

    def due(self) -> None:
        """Send the webhooks that are due (a round of the housekeeping loop)."""
        due = self.store.query(
            "SELECT * FROM jobs WHERE webhook_status = 'pending' AND status IN ('succeeded', 'failed') "
            "AND webhook_next_at <= ? ORDER BY webhook_next_at LIMIT 10", (time.time(),))
        for row in due:
            # Claim the delivery (workers share the table): whoever moves webhook_next_at first sends it. The
            # claim lasts from now, not from the start of the batch: the deliveries before this one took time,
            # and a claim already expired would let another worker send it too.
            claim_until = time.time() + WEBHOOK_CLAIM_FACTOR * self.settings.webhook_timeout_s + WEBHOOK_CLAIM_MARGIN_S
            if self.store.execute("UPDATE jobs SET webhook_next_at = ? WHERE id = ? AND webhook_next_at = ?",
                                  (claim_until, row["id"], row["webhook_next_at"])):
                self._deliver(row)

    def _deliver(self, row) -> None:
        principal = self.manager.state.keyring.principal_for(row["owner"])
        attempts = json.loads(row["webhook_attempts"])
        record: dict = {"at": iso(time.time())}
        delivered = unreadable = False
        event = None
        if principal is None or not principal.webhook_secret:
            record["error"] = "the API key or its webhook secret was removed"
        else:
            event_type = f"job.{row['status']}"
            try:
                # The same event on every attempt and from every worker (as Stripe's webhooks): receivers
                # deduplicate on its id.
                event = {"id": event_id(row["id"], event_type), "type": event_type,
                         "created_at": iso(row["finished_at"]), "data": self.manager.view(row, with_speakers=True)}
            except (ValueError, TypeError, KeyError):  # a stored result another version wrote, or damaged
                log.exception("job %s: its event could not be built", row["id"])
                record["error"] = "the job's stored result could not be read to build its event"
                unreadable = True
        if event is not None:
            body = json.dumps(event).encode()
            try:
                status = self.policy.deliver(row["callback_url"], principal.webhook_secret, body, event["id"])
                record["status_code"] = status
                delivered = 200 <= status < 300
            except DeliveryError as exc:
                record["error"] = str(exc)
        attempts.append(record)
        if delivered:
            status, next_at = "delivered", None
        elif len(attempts) >= self.settings.webhook_max_attempts or principal is None or unreadable:
            status, next_at = "failed", None
        else:
            delay = self.settings.webhook_backoff_s * 2 ** (len(attempts) - 1)
            status, next_at = "pending", time.time() + min(delay, 3600)
        self.store.execute("UPDATE jobs SET webhook_attempts = ?, webhook_status = ?, webhook_next_at = ? "
                           "WHERE id = ?", (json.dumps(attempts), status, next_at, row["id"]))
        log.info("job %s webhook attempt %d: %s", row["id"], len(attempts),
                 record.get("status_code", record.get("error")))


def event_id(job_id: str, event_type: str) -> str:
    """The id of a job's event: derived from the job, so it is the same on every attempt and every worker."""
    return "evt_" + hashlib.sha256(f"{job_id}/{event_type}".encode()).hexdigest()[:32]
