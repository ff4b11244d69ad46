/**
 * The browser's side of an upload: send the recording straight to pilotys-whisper with an upload grant.
 *
 * Vercel functions refuse request bodies over 4.5 MB, and an hour of meeting is 15-60 MB: the recording
 * cannot pass through a PILOTYS route. So the route only asks the server for a grant (`createUploadGrantHandler`
 * in whisper.ts, with the API key, which never leaves the server side) and the browser uploads with it. A grant
 * creates one job, with the options the route fixed, for a few minutes; used twice it returns the same job.
 *
 * This file has no Node.js import: it is safe in a client component. The server must allow PILOTYS's origin
 * (`whisper_service_cors_origins`).
 */
import type { Job } from "./whisper.js";

export interface UploadGrant {
  /** Absolute URL of the server's POST /v1/jobs. */
  uploadUrl: string;
  token: string;
  expiresAt: string;
  idempotencyKey: string;
}

export class WhisperError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly retryAfterSeconds?: number,
  ) {
    super(message);
    this.name = "WhisperError";
  }
}

/** The server's JSON error (or the status line) as a WhisperError. */
export async function errorFrom(response: Response): Promise<WhisperError> {
  let code = "http_error";
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = (await response.json()) as { error?: { code?: string; message?: string } };
    code = body.error?.code ?? code;
    message = body.error?.message ?? message;
  } catch {
    // not JSON: keep the status line
  }
  const retry = Number(response.headers.get("Retry-After"));
  return new WhisperError(response.status, code, message, Number.isFinite(retry) && retry > 0 ? retry : undefined);
}

/** Upload the recording with a grant; resolves with the job once the server has the audio on disk. */
export async function uploadWithGrant(
  audio: Blob,
  grant: UploadGrant,
  { filename = "meeting.webm", signal }: { filename?: string; signal?: AbortSignal } = {},
): Promise<Job> {
  const form = new FormData();
  form.append("file", audio, filename);
  const response = await fetch(grant.uploadUrl, {
    method: "POST",
    body: form,
    headers: { Authorization: `Bearer ${grant.token}` },
    signal,
  });
  if (!response.ok) throw await errorFrom(response);
  return (await response.json()) as Job;
}
