// Next.js App Router: POST /api/whisper-webhook, called by pilotys-whisper when a job ends.
import { createWebhookHandler } from "../../../src/whisper.js";

export const POST = createWebhookHandler({
  secret: process.env.WHISPER_WEBHOOK_SECRET ?? "",
  async onSucceeded(job, result) {
    // Store the transcript with the meeting (PILOTYS's database call goes here).
    console.log(`transcript of ${job.filename}: ${result.text.length} characters, ${result.segments.length} segments`);
  },
  async onFailed(job) {
    console.error(`transcription ${job.id} failed: ${job.error?.message}`);
  },
});
