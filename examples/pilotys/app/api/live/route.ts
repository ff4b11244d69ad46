// Next.js App Router: POST /api/live (JSON: {"meetingId": "..."}). Answers a live upload grant for `recordLive`
// (src/live.ts): the browser streams the meeting to pilotys-whisper while it is recorded. Asked again for the same
// meeting (a reload, a grant about to expire), it authorizes the same upload and job.
import { createUploadGrantHandler } from "../../../src/whisper.js";

export const POST = createUploadGrantHandler({
  live: true,
  callbackUrl: process.env.WHISPER_CALLBACK_URL, // the transcript also comes to /api/whisper-webhook
  language: "fr",
  expiresIn: 3600,
  // Keep this route behind PILOTYS's session check (its middleware, or `authorize: async (request) => ...`).
});
