// Next.js App Router: POST /api/whisper-webhook, called by pilotys-whisper when a job ends.
import { createWebhookHandler, renderMinutes } from "../../../src/whisper.js";

export const POST = createWebhookHandler({
  secret: process.env.WHISPER_WEBHOOK_SECRET ?? "",
  async onSucceeded(job, result) {
    // Store the transcript with the meeting (PILOTYS's database call goes here). A diarized job (the grant
    // route's diarize: true) carries its speakers: the minutes say who said what.
    console.log(`transcript of ${job.filename}: ${result.text.length} characters, ${result.segments.length} segments`);
    if (job.speakers) console.log(renderMinutes(result, job.speakers));
  },
  async onFailed(job) {
    console.error(`transcription ${job.id} failed: ${job.error?.message}`);
  },
});
