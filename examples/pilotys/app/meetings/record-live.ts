// In the browser (a client component): record the meeting live; call it again after a reload to go on.
import { recordLive, type LiveRecording, type LiveSegment } from "../../src/live.js";
import type { UploadGrant } from "../../src/upload.js";

async function liveGrant(meetingId: string): Promise<UploadGrant> {
  const response = await fetch("/api/live", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ meetingId }),
  });
  if (!response.ok) throw new Error(`no live upload grant: ${response.status}`);
  return (await response.json()) as UploadGrant;
}

export function recordMeeting(meetingId: string, show: (segment: LiveSegment) => void): Promise<LiveRecording> {
  return recordLive({
    meetingId,
    getGrant: liveGrant,
    eventsUrl: (jobId) => `/api/whisper/jobs/${encodeURIComponent(jobId)}/events`,
    onSegment: show, // the final transcript comes to /api/whisper-webhook as for an uploaded recording
  });
}
