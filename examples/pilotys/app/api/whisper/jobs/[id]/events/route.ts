// Next.js App Router: GET /api/whisper/jobs/{id}/events relays the job's live events (Server-Sent Events) with the
// API key, which an EventSource cannot send. A cut stream (the network, the function's time limit) resumes after
// its last event: EventSource sends Last-Event-ID, which the handler passes on.
import { createJobEventsHandler } from "../../../../../../src/whisper.js";

export const dynamic = "force-dynamic"; // a stream, never cached
export const GET = createJobEventsHandler({
  // Check here that the session's user may follow this job (the meeting's job id is stored with the meeting):
  // authorize: async (request, jobId) => ...,
});
