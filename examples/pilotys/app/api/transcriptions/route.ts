// Next.js App Router: POST /api/transcriptions (multipart: file, meetingId). Returns at once with the job id;
// the transcript arrives later at /api/whisper-webhook. Runs well within Vercel's 10 s (Hobby) limit.
import { createUploadHandler } from "../../../src/whisper.js";

export const maxDuration = 60;

export const POST = createUploadHandler({
  callbackUrl: process.env.WHISPER_CALLBACK_URL, // e.g. https://app.pilotys.fr/api/whisper-webhook
  language: "fr",
});
