/**
 * PILOTYS side of pilotys-whisper: send a meeting recording as a job, then either receive the signed
 * webhook or poll. On Vercel a route cannot receive a recording over 4.5 MB: there the route hands the
 * browser an upload grant (`createUploadGrantHandler`) and the browser uploads itself (upload.ts); in any
 * other Node.js >= 18 code, `submitJob` uploads directly.
 *
 * Configuration: WHISPER_API_URL (e.g. https://whisper.example.com) and WHISPER_API_KEY; for webhooks,
 * WHISPER_WEBHOOK_SECRET (the webhook_secret configured for that key on the server).
 */
import { createHmac, timingSafeEqual } from "node:crypto";

import { WhisperError, errorFrom, type UploadGrant } from "./upload.js";

export { WhisperError, uploadWithGrant, type UploadGrant } from "./upload.js";

export type JobStatus = "queued" | "running" | "succeeded" | "failed" | "cancelled";
export type ResultFormat = "json" | "text" | "srt" | "vtt" | "verbose_json" | "diarized_json";

/** One speaker's total talk time in a diarized transcript (seconds). */
export interface SpeakerTime {
  speaker: string;
  duration: number;
}

/** A segment of `verbose_json`; `speaker` when the job was diarized ("A", "B"... or a known speaker's name). */
export interface Segment {
  id: number;
  start: number;
  end: number;
  text: string;
  speaker?: string;
}

export interface VerboseTranscript {
  task: "transcribe" | "translate";
  language: string | null;
  duration: number;
  text: string;
  segments: Segment[];
}

/** `diarized_json`, OpenAI's shape (gpt-4o-transcribe-diarize). */
export interface DiarizedTranscript {
  task: "transcribe" | "translate";
  duration: number;
  text: string;
  segments: Array<{ type: "transcript.text.segment"; id: string; start: number; end: number; text: string; speaker: string }>;
  usage: { type: "duration"; seconds: number };
}

export interface Job {
  id: string;
  object: "transcription.job";
  status: JobStatus;
  progress: number;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  expires_at: string | null;
  filename: string | null;
  duration: number | null;
  attempts: number;
  error: { code: string; message: string } | null;
  webhook: { url: string; status: string; attempts: Array<Record<string, unknown>> } | null;
  links: { self: string; result: string; cancel: string };
  /** A succeeded diarized job's speakers and their talk time, in order of first appearance (in GET /v1/jobs/{id} and the webhook). */
  speakers?: SpeakerTime[];
}

export interface WebhookEvent {
  id: string;
  type: "job.succeeded" | "job.failed";
  created_at: string;
  data: Job;
}

export interface WhisperConfig {
  apiUrl: string;
  apiKey: string;
  /** Per-request timeout in milliseconds (uploads of long meetings can take a while). */
  timeoutMs?: number;
}

export interface SubmitOptions {
  filename: string;
  language?: string;
  prompt?: string;
  responseFormat?: ResultFormat;
  wordTimestamps?: boolean;
  /** https URL that receives the signed webhook when the job ends. */
  callbackUrl?: string;
  /** Same key on a retried upload: the server returns the job it already has instead of a second one. */
  idempotencyKey?: string;
  /** Who said what: each segment gets its speaker (the server must have diarization turned on). */
  diarize?: boolean;
  /** With diarize: the exact number of speakers, or bounds on it (1-32); estimated when absent. */
  numSpeakers?: number;
  minSpeakers?: number;
  maxSpeakers?: number;
  /** With diarize: up to 4 known voices, each a 1-30 s clip of that person speaking, named in the transcript. */
  knownSpeakers?: Array<{ name: string; reference: Blob }>;
}

function appendSpeakerOptions(form: FormData, options: Omit<SubmitOptions, "filename">): void {
  if (!options.diarize) return;
  form.append("diarize", "true");
  if (options.numSpeakers !== undefined) form.append("num_speakers", String(options.numSpeakers));
  if (options.minSpeakers !== undefined) form.append("min_speakers", String(options.minSpeakers));
  if (options.maxSpeakers !== undefined) form.append("max_speakers", String(options.maxSpeakers));
  for (const { name, reference } of options.knownSpeakers ?? []) {
    form.append("known_speaker_names[]", name);
    form.append("known_speaker_references[]", reference, `${name}.audio`);
  }
}

export function configFromEnv(env: NodeJS.ProcessEnv = process.env): WhisperConfig {
  const apiUrl = env.WHISPER_API_URL;
  const apiKey = env.WHISPER_API_KEY;
  if (!apiUrl || !apiKey) {
    throw new Error("set WHISPER_API_URL and WHISPER_API_KEY");
  }
  return { apiUrl: apiUrl.replace(/\/+$/, ""), apiKey };
}

async function call(config: WhisperConfig, path: string, init: RequestInit = {}): Promise<Response> {
  const headers = new Headers(init.headers);
  headers.set("Authorization", `Bearer ${config.apiKey}`);
  let response: Response;
  try {
    response = await fetch(`${config.apiUrl}${path}`, {
      ...init,
      headers,
      signal: AbortSignal.timeout(config.timeoutMs ?? 120_000),
    });
  } catch (error) {
    // No answer (refused, reset, timed out): a WhisperError too, so that a route relays it as a 502 and a
    // browser retries, instead of a request left without a response.
    throw new WhisperError(502, "server_unreachable", `the transcription server did not answer: ${(error as Error).message}`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

/** Upload a recording as a job. Resolves once the server has it safely on disk (202), or the earlier job. */
export async function submitJob(
  audio: Blob,
  options: SubmitOptions,
  config: WhisperConfig = configFromEnv(),
): Promise<Job> {
  const form = new FormData();
  form.append("file", audio, options.filename);
  if (options.language) form.append("language", options.language);
  if (options.prompt) form.append("prompt", options.prompt);
  if (options.responseFormat) form.append("response_format", options.responseFormat);
  if (options.wordTimestamps) form.append("timestamp_granularities[]", "word");
  if (options.callbackUrl) form.append("callback_url", options.callbackUrl);
  appendSpeakerOptions(form, options);
  const headers: Record<string, string> = {};
  if (options.idempotencyKey) headers["Idempotency-Key"] = options.idempotencyKey;
  const response = await call(config, "/v1/jobs", { method: "POST", body: form, headers });
  return (await response.json()) as Job;
}

/** The job's options, fixed by the grant (the browser names only the file; no known speakers' clips in a grant). */
export interface GrantOptions extends Omit<SubmitOptions, "filename" | "knownSpeakers"> {
  /** Seconds the grant stays valid (60-3600; the server's default is 900). */
  expiresIn?: number;
  /** For a live upload (tus, POST /v1/live: `recordLive` in live.ts), which it also lets feed and resume. */
  live?: boolean;
}

/** Ask the server for an upload grant (with the API key): a token the browser uses to create one job. */
export async function createUploadGrant(
  options: GrantOptions = {},
  config: WhisperConfig = configFromEnv(),
): Promise<UploadGrant> {
  const body = {
    language: options.language,
    prompt: options.prompt,
    response_format: options.responseFormat,
    timestamp_granularities: options.wordTimestamps ? ["segment", "word"] : undefined,
    callback_url: options.callbackUrl,
    idempotency_key: options.idempotencyKey,
    expires_in: options.expiresIn,
    diarize: options.diarize || undefined,
    num_speakers: options.diarize ? options.numSpeakers : undefined,
    min_speakers: options.diarize ? options.minSpeakers : undefined,
    max_speakers: options.diarize ? options.maxSpeakers : undefined,
    live: options.live || undefined,
  };
  const response = await call(config, "/v1/uploads", {
    method: "POST",
    body: JSON.stringify(body),
    headers: { "Content-Type": "application/json" },
  });
  const grant = (await response.json()) as { token: string; upload_url: string; expires_at: string; idempotency_key: string };
  return {
    uploadUrl: `${config.apiUrl}${grant.upload_url}`,
    token: grant.token,
    expiresAt: grant.expires_at,
    idempotencyKey: grant.idempotency_key,
  };
}

export async function getJob(id: string, config: WhisperConfig = configFromEnv()): Promise<Job> {
  return (await (await call(config, `/v1/jobs/${encodeURIComponent(id)}`)).json()) as Job;
}

export async function cancelJob(id: string, config: WhisperConfig = configFromEnv()): Promise<Job> {
  const response = await call(config, `/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
  return (await response.json()) as Job;
}

export async function getResult(
  id: string,
  format: ResultFormat = "json",
  config: WhisperConfig = configFromEnv(),
): Promise<string> {
  const response = await call(config, `/v1/jobs/${encodeURIComponent(id)}/result?format=${format}`);
  return response.text();
}

/** Poll until the job ends (for a worker or a cron, not a Vercel function: that is what webhooks are for). */
export async function waitForJob(
  id: string,
  { intervalMs = 2000, timeoutMs = 3_600_000, onProgress }: {
    intervalMs?: number;
    timeoutMs?: number;
    onProgress?: (job: Job) => void;
  } = {},
  config: WhisperConfig = configFromEnv(),
): Promise<Job> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const job = await getJob(id, config);
    onProgress?.(job);
    if (job.status === "succeeded" || job.status === "failed" || job.status === "cancelled") return job;
    if (Date.now() > deadline) throw new Error(`job ${id} still ${job.status} after ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/**
 * Check a webhook's `Whisper-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.
 * Use the raw body exactly as received (before any JSON parsing); stale timestamps are refused.
 */
export function verifyWebhookSignature(
  rawBody: string | Uint8Array,
  header: string | null,
  secret: string,
  { toleranceSeconds = 300, now = Date.now() / 1000 }: { toleranceSeconds?: number; now?: number } = {},
): boolean {
  if (!header) return false;
  const parts = new Map(
    header.split(",").map((item) => {
      const at = item.indexOf("=");
      return [item.slice(0, at).trim(), item.slice(at + 1).trim()] as [string, string];
    }),
  );
  const timestamp = Number(parts.get("t"));
  const given = parts.get("v1") ?? "";
  if (!Number.isInteger(timestamp) || Math.abs(now - timestamp) > toleranceSeconds) return false;
  const body = typeof rawBody === "string" ? Buffer.from(rawBody) : Buffer.from(rawBody);
  const expected = createHmac("sha256", secret).update(`${timestamp}.`).update(body).digest("hex");
  const a = Buffer.from(expected, "hex");
  const b = Buffer.from(given, "hex");
  return a.length === b.length && timingSafeEqual(a, b);
}

/** For a route handler: read the raw body, verify it, and return the event (or throw a 401 WhisperError). */
export async function readWebhook(request: Request, secret: string): Promise<WebhookEvent> {
  const raw = new Uint8Array(await request.arrayBuffer());
  if (!verifyWebhookSignature(raw, request.headers.get("Whisper-Signature"), secret)) {
    throw new WhisperError(401, "invalid_signature", "webhook signature does not match");
  }
  return JSON.parse(Buffer.from(raw).toString("utf8")) as WebhookEvent;
}

/**
 * Route handler that grants an upload (Next.js App Router: `export const POST = createUploadGrantHandler(...)`).
 * Body: JSON `{"meetingId": "..."}`; answers `{uploadUrl, token, expiresAt}` for `uploadWithGrant` in the
 * browser. `authorize` decides who may upload (check PILOTYS's session there): a grant spends server time.
 */
export function createUploadGrantHandler({
  callbackUrl,
  language = "fr",
  diarize = false,
  live = false,
  expiresIn,
  authorize,
  config,
}: {
  callbackUrl?: string;
  language?: string;
  /** Meetings come back with their speakers (the server must have diarization on). */
  diarize?: boolean;
  /** A grant for `recordLive` (live.ts): the meeting streamed with tus while it is recorded. */
  live?: boolean;
  /** Seconds a grant lasts (60-3600); `recordLive` asks for a new one before it expires. */
  expiresIn?: number;
  authorize?: (request: Request) => Promise<boolean>;
  config?: WhisperConfig;
} = {}) {
  return async function POST(request: Request): Promise<Response> {
    if (authorize && !(await authorize(request))) return jsonResponse({ error: "not allowed" }, 403);
    let meetingId: unknown;
    try {
      ({ meetingId } = (await request.json()) as { meetingId?: unknown });
    } catch {
      return jsonResponse({ error: "send JSON: {\"meetingId\": \"...\"}" }, 400);
    }
    if (typeof meetingId !== "string" || !meetingId) return jsonResponse({ error: "meetingId is required" }, 400);
    try {
      // One job per meeting, however many times the browser asks for a grant and uploads.
      // A live grant asked again (a reload, an expired grant) authorizes the same upload: the key is the meeting.
      const grant = await createUploadGrant(
        { language, callbackUrl, diarize, live, expiresIn, idempotencyKey: `meeting-${meetingId}` },
        config ?? configFromEnv());
      return jsonResponse(grant, 201);
    } catch (error) {
      if (error instanceof WhisperError) return relayed(error);
      throw error;
    }
  };
}

/**
 * Route handler that receives the recording and uploads it (`export const POST = createUploadHandler(...)`).
 * Not on Vercel beyond 4.5 MB (its functions refuse larger bodies): use `createUploadGrantHandler` there.
 */
export function createUploadHandler({
  callbackUrl,
  language = "fr",
  diarize = false,
  config,
}: { callbackUrl?: string; language?: string; diarize?: boolean; config?: WhisperConfig } = {}) {
  return async function POST(request: Request): Promise<Response> {
    const form = await request.formData();
    const file = form.get("file");
    if (!(file instanceof Blob)) {
      return jsonResponse({ error: "send the recording as the multipart field 'file'" }, 400);
    }
    const meetingId = form.get("meetingId");
    try {
      const job = await submitJob(
        file,
        {
          filename: "name" in file && typeof file.name === "string" ? file.name : "meeting.webm",
          language,
          callbackUrl,
          diarize,
          // A retried upload of the same meeting must not start a second transcription.
          idempotencyKey: typeof meetingId === "string" && meetingId ? `meeting-${meetingId}` : undefined,
        },
        config ?? configFromEnv(),
      );
      return jsonResponse({ jobId: job.id, status: job.status }, 202);
    } catch (error) {
      if (error instanceof WhisperError) return relayed(error);
      throw error;
    }
  };
}

/**
 * Route handler that relays a job's live events to the browser (`export const GET = createJobEventsHandler(...)`
 * in `app/api/whisper/jobs/[id]/events/route.ts`): an EventSource cannot send the API key, so the route adds it.
 * `Last-Event-ID` (an EventSource's reconnection) and `?last_event_id=` pass through, so a stream cut by the
 * network or by the platform's time limit on a function resumes after the last event, with no repeat.
 * `authorize` decides who may follow which job (PILOTYS's session and the meeting's owner).
 */
export function createJobEventsHandler({
  authorize,
  config,
}: {
  authorize?: (request: Request, jobId: string) => Promise<boolean>;
  config?: WhisperConfig;
} = {}) {
  return async function GET(
    request: Request,
    context?: { params: Promise<{ id: string }> | { id: string } },
  ): Promise<Response> {
    const url = new URL(request.url);
    const jobId = (await context?.params)?.id ?? url.pathname.match(/\/jobs\/([^/]+)\/events\/?$/)?.[1];
    if (!jobId) return jsonResponse({ error: "no job id in the path" }, 400);
    if (authorize && !(await authorize(request, jobId))) return jsonResponse({ error: "not allowed" }, 403);
    const { apiUrl, apiKey } = config ?? configFromEnv();
    const headers: Record<string, string> = { Authorization: `Bearer ${apiKey}`, Accept: "text/event-stream" };
    const resumeAfter = request.headers.get("Last-Event-ID") ?? url.searchParams.get("last_event_id");
    if (resumeAfter) headers["Last-Event-ID"] = resumeAfter;
    let upstream: Response;
    try {
      // No timeout: the stream lasts the meeting; the browser going away (request.signal) closes it upstream.
      upstream = await fetch(`${apiUrl}/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal: request.signal });
    } catch {
      return jsonResponse({ error: "the transcription server cannot be reached" }, 502);
    }
    if (upstream.status === 204) return new Response(null, { status: 204 }); // the job has ended: EventSource stops
    if (!upstream.ok) return relayed(await errorFrom(upstream));
    return new Response(upstream.body, {
      status: 200,
      headers: { "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no" },
    });
  };
}

/** Route handler for the webhook: verifies the signature, then hands the transcript (or the failure) on. */
export function createWebhookHandler({
  secret,
  onSucceeded,
  onFailed,
  config,
}: {
  secret: string;
  onSucceeded: (job: Job, result: VerboseTranscript) => Promise<void>;
  onFailed?: (job: Job) => Promise<void>;
  config?: WhisperConfig;
}) {
  return async function POST(request: Request): Promise<Response> {
    let event: WebhookEvent;
    try {
      event = await readWebhook(request, secret);
    } catch (error) {
      if (error instanceof WhisperError) return jsonResponse({ error: error.message }, 401);
      return jsonResponse({ error: "malformed webhook" }, 400);
    }
    if (event.type === "job.succeeded") {
      const result = JSON.parse(await getResult(event.data.id, "verbose_json", config ?? configFromEnv())) as VerboseTranscript;
      await onSucceeded(event.data, result);
    } else {
      await onFailed?.(event.data);
    }
    return new Response(null, { status: 204 });
  };
}

/** One speaker's turn in the minutes: consecutive segments of the same speaker, joined. */
export interface Turn {
  speaker: string;
  start: number;
  end: number;
  text: string;
}

/** A diarized transcript's segments as turns: a new turn each time the speaker changes. */
export function turnsBySpeaker(segments: ReadonlyArray<Pick<Segment, "start" | "end" | "text" | "speaker">>): Turn[] {
  const turns: Turn[] = [];
  for (const segment of segments) {
    const text = segment.text.trim();
    if (!text) continue;
    const speaker = segment.speaker ?? "?";
    const last = turns.at(-1);
    if (last && last.speaker === speaker) {
      last.end = segment.end;
      last.text += ` ${text}`;
    } else {
      turns.push({ speaker, start: segment.start, end: segment.end, text });
    }
  }
  return turns;
}

function clock(seconds: number): string {
  const total = Math.max(0, Math.floor(seconds));
  const h = Math.floor(total / 3600);
  const mm = String(Math.floor((total % 3600) / 60)).padStart(2, "0");
  const ss = String(total % 60).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

/**
 * Meeting minutes by speaker, in Markdown: who spoke how long, then each turn with its time and speaker.
 * `names` renames the server's labels ("A" -> "Claire") when PILOTYS knows who is who.
 */
export function renderMinutes(
  transcript: { segments: ReadonlyArray<Pick<Segment, "start" | "end" | "text" | "speaker">> },
  speakers: ReadonlyArray<SpeakerTime> = [],
  names: Readonly<Record<string, string>> = {},
): string {
  const name = (label: string) => names[label] ?? label;
  const lines: string[] = [];
  if (speakers.length) {
    lines.push("## Participants", "");
    for (const { speaker, duration } of speakers) lines.push(`- ${name(speaker)}: ${clock(duration)}`);
    lines.push("");
  }
  lines.push("## Transcript", "");
  for (const turn of turnsBySpeaker(transcript.segments)) {
    lines.push(`**${name(turn.speaker)}** (${clock(turn.start)}): ${turn.text}`, "");
  }
  return lines.join("\n");
}

/** The server's refusal, passed on to PILOTYS's caller (its own failures as 502). */
function relayed(error: WhisperError): Response {
  const headers: Record<string, string> = error.retryAfterSeconds ? { "Retry-After": String(error.retryAfterSeconds) } : {};
  return jsonResponse({ error: error.message, code: error.code }, error.status >= 500 ? 502 : error.status, headers);
}

function jsonResponse(body: unknown, status: number, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json", ...headers } });
}
