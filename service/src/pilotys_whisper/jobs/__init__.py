"""Jobs: long recordings transcribed in the background, their live uploads, events and webhooks.

The domain below the HTTP routes (routes/jobs.py, routes/live.py): nothing here imports Flask or the routes.
- manager.py: JobManager, accepting, running and finishing jobs; sqlite.py and postgres.py, its two backends;
- live.py and live_storage.py: live uploads (tus), durable as they arrive;
- events.py: a job's live events; deliveries.py and webhooks.py: its signed webhooks.
"""

from .live import LiveUploads
from .manager import JobManager
from .schema import FINISHED, STATUSES, DuplicateJob

__all__ = ["FINISHED", "STATUSES", "DuplicateJob", "JobManager", "LiveUploads"]
