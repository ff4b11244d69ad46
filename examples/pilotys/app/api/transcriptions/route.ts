// Next.js App Router: POST /api/transcriptions (JSON: {"meetingId": "..."}). Answers with an upload grant;
// the browser then sends the recording straight to pilotys-whisper (`uploadWithGrant` from src/upload.ts),
// since a Vercel function refuses bodies over 4.5 MB. The transcript arrives later at /api/whisper-webhook.
import { createUploadGrantHandler } from "../../../src/whisper.js";

export const POST = createUploadGrantHandler({
  callbackUrl: process.env.WHISPER_CALLBACK_URL, // e.g. https://app.pilotys.fr/api/whisper-webhook
  language: "fr",
  // Minutes by speaker (the webhook route renders them): the server needs whisper_service_diarization: true.
  diarize: true,
  // A grant spends the server's time: keep this route behind PILOTYS's session check (its middleware, or an
  // `authorize: async (request) => ...` option here).
});
