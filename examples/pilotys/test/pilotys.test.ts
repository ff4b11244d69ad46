// The PILOTYS client against the real service (real model), with a real HTTPS webhook receiver.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { createServer as createHttpsServer, type Server } from "node:https";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

import {
  WhisperError,
  cancelJob,
  createUploadGrantHandler,
  createUploadHandler,
  createWebhookHandler,
  getResult,
  renderMinutes,
  submitJob,
  turnsBySpeaker,
  uploadWithGrant,
  verifyWebhookSignature,
  waitForJob,
  type Job,
  type UploadGrant,
  type VerboseTranscript,
  type WhisperConfig,
} from "../src/whisper.js";
import { ASSETS, PYTHON, ROOT, startService, until as untilReady, type Service } from "./harness.js";

const KEY = "pilotys-test-key-0123456789";
const SECRET = "pilotys-webhook-secret-0123456789";
const ORIGIN = "https://app.pilotys.example";
// The most a Vercel function accepts as a request body.
const VERCEL_BODY_LIMIT = 4.5 * 1000 * 1000;
const work = mkdtempSync(join(tmpdir(), "pilotys-client-"));

let service: Service;
let receiver: Server;
let config: WhisperConfig;
let callbackUrl: string;
const delivered: Array<{ job: Job; text: string; result: VerboseTranscript }> = [];

function recording(name = "fr_meeting.webm"): Blob {
  return new Blob([readFileSync(join(ASSETS, "audio", name))], { type: "audio/webm" });
}

function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 120_000): Promise<T> {
  return untilReady(what, probe, timeoutMs, () => service.log());
}

before(async () => {
  // A certificate for the webhook receiver, trusted by the service through WHISPER_WEBHOOK_CA_FILE.
  execFileSync("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
    "-keyout", join(work, "hook.key"), "-out", join(work, "hook.crt"), "-days", "1", "-subj", "/CN=127.0.0.1",
    "-addext", "subjectAltName=IP:127.0.0.1"], { stdio: "ignore" });
  writeFileSync(join(work, "keys"), `${KEY} label=pilotys webhook_secret=${SECRET}\n`);

  service = await startService({
    WHISPER_API_KEYS_FILE: join(work, "keys"),
    WHISPER_STATE_DIR: join(work, "state"),
    WHISPER_WEBHOOK_ALLOW_PRIVATE: "127.0.0.0/8",
    WHISPER_WEBHOOK_CA_FILE: join(work, "hook.crt"),
    WHISPER_WEBHOOK_BACKOFF_S: "1",
    WHISPER_CORS_ORIGINS: ORIGIN,
    // Speakers, with the ONNX speaker model `make assets` builds.
    WHISPER_DIARIZATION: "true",
    WHISPER_DIARIZATION_MODEL: join(ASSETS, "models", "ge2e", "ge2e.onnx"),
  });
  config = { apiUrl: service.url, apiKey: KEY };

  // PILOTYS's webhook route, served over HTTPS as Vercel would.
  const webhook = createWebhookHandler({
    secret: SECRET,
    config,
    async onSucceeded(job, result) {
      delivered.push({ job, text: result.text, result });
    },
  });
  receiver = createHttpsServer(
    { key: readFileSync(join(work, "hook.key")), cert: readFileSync(join(work, "hook.crt")) },
    async (req, res) => {
      const chunks: Buffer[] = [];
      for await (const chunk of req) chunks.push(chunk as Buffer);
      const request = new Request(`https://127.0.0.1${req.url}`, {
        method: req.method,
        headers: req.headers as Record<string, string>,
        body: Buffer.concat(chunks),
      });
      const response = await webhook(request);
      res.writeHead(response.status, Object.fromEntries(response.headers));
      res.end(Buffer.from(await response.arrayBuffer()));
    },
  );
  await new Promise<void>((done) => receiver.listen(0, "127.0.0.1", done));
  callbackUrl = `https://127.0.0.1:${(receiver.address() as AddressInfo).port}/api/whisper-webhook`;
});

after(async () => {
  receiver?.close();
  await service?.stop();
});

describe("PILOTYS with pilotys-whisper", () => {
  it("uploads through the route handler and receives the transcript by signed webhook", async () => {
    const upload = createUploadHandler({ callbackUrl, config });
    const form = new FormData();
    form.append("file", recording(), "meeting-42.webm");
    form.append("meetingId", "42");
    const response = await upload(new Request("https://app.example/api/transcriptions", { method: "POST", body: form }));
    assert.equal(response.status, 202);
    const { jobId } = (await response.json()) as { jobId: string };
    const got = await until("the webhook", async () => delivered.find((d) => d.job.id === jobId));
    assert.equal(got.job.status, "succeeded");
    assert.match(got.text.toLowerCase(), /bonjour/);
    assert.match(got.text.toLowerCase(), /réunion/);
  });

  it("grants the browser an upload past Vercel's 4.5 MB, which the browser sends without the API key", async () => {
    const grantRoute = createUploadGrantHandler({ callbackUrl, language: "en", config });
    const asked = await grantRoute(new Request("https://app.example/api/transcriptions", {
      method: "POST", body: JSON.stringify({ meetingId: "long-1" }), headers: { "Content-Type": "application/json" } }));
    assert.equal(asked.status, 201);
    const grant = (await asked.json()) as UploadGrant;
    assert.equal(grant.uploadUrl, `${config.apiUrl}/v1/jobs`);
    assert.ok(!grant.token.includes(KEY));

    // The browser's preflight for its cross-origin upload with an Authorization header.
    const preflight = await fetch(grant.uploadUrl, { method: "OPTIONS", headers: {
      Origin: ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization" } });
    assert.equal(preflight.headers.get("Access-Control-Allow-Origin"), ORIGIN);
    assert.match(preflight.headers.get("Access-Control-Allow-Headers") ?? "", /Authorization/);

    const audio = recording("news_en_169s.wav");
    assert.ok(audio.size > VERCEL_BODY_LIMIT, `${audio.size} bytes: the test needs a recording a Vercel route refuses`);
    const job = await uploadWithGrant(audio, grant, { filename: "news.wav" });
    const got = await until("the webhook", async () => delivered.find((d) => d.job.id === job.id));
    assert.equal(got.job.status, "succeeded");
    assert.match(got.text, /crack a joke/);

    // The browser retries (or the token leaked): the same job, not a second transcription.
    const again = await uploadWithGrant(recording("news_en_169s.wav"), grant, { filename: "news.wav" });
    assert.equal(again.id, job.id);
    // The grant does nothing else: not even read the job it made.
    await assert.rejects(getResult(job.id, "text", { ...config, apiKey: grant.token }),
      (error: unknown) => error instanceof WhisperError && error.status === 403 && error.code === "upload_grant_not_accepted");
    const refused = await grantRoute(new Request("https://app.example/api/transcriptions", { method: "POST", body: "{}" }));
    assert.equal(refused.status, 400);
  });

  it("polls a job to the end with monotonic progress, then reads the result", async () => {
    const job = await submitJob(recording("news_en_169s.wav"), { filename: "news.wav", language: "en" }, config);
    const seen: number[] = [];
    const done = await waitForJob(job.id, { intervalMs: 200, onProgress: (j) => seen.push(j.progress) }, config);
    assert.equal(done.status, "succeeded");
    assert.deepEqual(seen, [...seen].sort((a, b) => a - b));
    assert.equal(seen.at(-1), 1);
    const text = await getResult(job.id, "text", config);
    assert.match(text, /crack a joke/);
    const srt = await getResult(job.id, "srt", config);
    assert.match(srt, /^1\n00:00:00,\d{3} --> /);
  });

  it("does not start a second job for a retried upload", async () => {
    const first = await submitJob(recording(), { filename: "m.webm", idempotencyKey: "meeting-7" }, config);
    const again = await submitJob(recording(), { filename: "m.webm", idempotencyKey: "meeting-7" }, config);
    assert.equal(again.id, first.id);
  });

  it("cancels a job", async () => {
    const job = await submitJob(recording("news_en_169s.wav"), { filename: "n.wav", language: "en" }, config);
    await cancelJob(job.id, config);
    const done = await waitForJob(job.id, { intervalMs: 200 }, config);
    assert.equal(done.status, "cancelled");
  });

  it("renders the minutes of a diarized meeting by speaker, from the webhook", async () => {
    // Three synthesized French voices (service/tests/speakers.py, shared with the service's tests).
    const wav = join(work, "three_speakers.wav");
    execFileSync(PYTHON, ["-c", "import sys; from pathlib import Path; from speakers import three_speakers, write_wav; "
      + "write_wav(Path(sys.argv[1]), three_speakers().audio)", wav],
      { env: { ...process.env, PYTHONPATH: join(ROOT, "service", "tests") } });
    const audio = new Blob([readFileSync(wav)], { type: "audio/wav" });
    const job = await submitJob(audio, { filename: "comite.wav", diarize: true, callbackUrl }, config);
    // A guard against a job that never ends (generous: a loaded machine), not a speed check.
    const got = await until("the webhook", async () => delivered.find((d) => d.job.id === job.id), 1_200_000);
    assert.equal(got.job.status, "succeeded");
    const speakers = got.job.speakers ?? [];
    assert.equal(speakers.length, 3, JSON.stringify(speakers));
    assert.ok(got.result.segments.length > 0 && got.result.segments.every((s) => typeof s.speaker === "string"));
    const minutes = renderMinutes(got.result, speakers, { A: "Claire" });
    assert.match(minutes, /^## Participants\n\n- Claire: 00:\d\d\n/);
    assert.match(minutes, /\*\*Claire\*\* \(00:00\): \S/); // the first turn is hers (the words are Whisper base's)
    for (const { speaker } of speakers.slice(1)) assert.match(minutes, new RegExp(`\\*\\*${speaker}\\*\\* \\(`));
    const diarized = JSON.parse(await getResult(job.id, "diarized_json", config));
    assert.equal(diarized.segments[0].type, "transcript.text.segment");
  });

  it("joins a speaker's consecutive segments into one turn", () => {
    const turns = turnsBySpeaker([
      { start: 0, end: 2, text: " Bonjour.", speaker: "A" },
      { start: 2, end: 4, text: " On commence.", speaker: "A" },
      { start: 4, end: 5, text: " D'accord.", speaker: "B" },
      { start: 5, end: 6, text: "  ", speaker: "B" },
      { start: 6, end: 9, text: " Premier point.", speaker: "A" },
    ]);
    assert.deepEqual(turns, [
      { speaker: "A", start: 0, end: 4, text: "Bonjour. On commence." },
      { speaker: "B", start: 4, end: 5, text: "D'accord." },
      { speaker: "A", start: 6, end: 9, text: "Premier point." },
    ]);
    assert.equal(renderMinutes({ segments: [{ start: 61, end: 62, text: "Oui.", speaker: "B" }] }, [], { B: "Marc" }),
      "## Transcript\n\n**Marc** (01:01): Oui.\n");
  });

  it("rejects forged, altered and stale webhooks", async () => {
    const body = JSON.stringify({ id: "evt_1", type: "job.succeeded", data: {} });
    const t = Math.floor(Date.now() / 1000);
    const { createHmac } = await import("node:crypto");
    const good = `t=${t},v1=${createHmac("sha256", SECRET).update(`${t}.${body}`).digest("hex")}`;
    assert.equal(verifyWebhookSignature(body, good, SECRET), true);
    assert.equal(verifyWebhookSignature(body + " ", good, SECRET), false);
    assert.equal(verifyWebhookSignature(body, good, "another-secret"), false);
    assert.equal(verifyWebhookSignature(body, good, SECRET, { now: t + 3600 }), false);
    assert.equal(verifyWebhookSignature(body, null, SECRET), false);
    const handler = createWebhookHandler({ secret: SECRET, config, onSucceeded: async () => assert.fail() });
    const forged = await handler(new Request("https://x/", {
      method: "POST", body, headers: { "Whisper-Signature": `t=${t},v1=${"0".repeat(64)}` } }));
    assert.equal(forged.status, 401);
  });

  it("surfaces the server's errors", async () => {
    await assert.rejects(
      submitJob(recording(), { filename: "m.webm" }, { ...config, apiKey: "wrong-key-000000000000" }),
      (error: unknown) => error instanceof WhisperError && error.status === 401 && error.code === "invalid_api_key",
    );
    await assert.rejects(
      submitJob(new Blob([new Uint8Array(0)]), { filename: "empty.webm" }, config),
      (error: unknown) => error instanceof WhisperError && error.status === 400 && error.code === "empty_file",
    );
  });
});
