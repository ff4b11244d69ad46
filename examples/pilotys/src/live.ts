/**
 * The browser's side of a live meeting: record as it goes, send each piece at once, survive a reload.
 *
 * `recordLive()` records the microphone with MediaRecorder (WebM/Opus, a blob every `timesliceMs`), keeps every
 * blob in IndexedDB before it is sent, and streams the recording to pilotys-whisper with tus (`tus-js-client`,
 * `POST /v1/live` with a deferred length), authorised by a live upload grant from a PILOTYS route (the API key
 * stays on the server side). The job's segments arrive from its event stream (EventSource, through a PILOTYS
 * route that adds the key) while the transcription runs.
 *
 * Nothing is lost to a dropped connection (tus retries, then resumes at the server's offset; the blobs wait in
 * IndexedDB meanwhile) nor to a reload or a crashed tab: `recordLive()` called again for the same meeting finds
 * the upload in tus-js-client's URL storage (its fingerprint is the meeting), sends what the server lacks from
 * IndexedDB, and appends the new recording to the same upload, so one meeting is one job. Each recording
 * session is a WebM stream of its own (MediaRecorder writes its header again); the service decodes them one
 * after the other.
 *
 * No Node.js import: this file is for a client component. The server must allow PILOTYS's origin
 * (`whisper_service_cors_origins`).
 */
import { Upload, type DetailedError, type HttpRequest, type HttpResponse, type PreviousUpload } from "tus-js-client";

import type { UploadGrant } from "./upload.js";

/** A final segment of the live transcript (an event `segment` of GET /v1/jobs/{id}/events). */
export interface LiveSegment {
  id: number;
  start: number;
  end: number;
  text: string;
  speaker?: string;
}

export type LiveOutcome = "succeeded" | "failed" | "cancelled";

export interface RecordLiveOptions {
  meetingId: string;
  /** Fetches a live upload grant for this meeting from PILOTYS (`createLiveUploadGrantHandler`). */
  getGrant: (meetingId: string) => Promise<UploadGrant>;
  /** The PILOTYS route that relays the job's events (`createJobEventsHandler`). */
  eventsUrl: (jobId: string) => string;
  onSegment?: (segment: LiveSegment) => void;
  /** Once the server has created the job (or, after a reload, once it is found again). */
  onJob?: (jobId: string) => void;
  /** The job's end: its transcript is then at GET /v1/jobs/{id}/result (and at the webhook). */
  onOutcome?: (outcome: LiveOutcome, job: unknown) => void;
  /** Bytes acknowledged by the server and bytes recorded so far. */
  onProgress?: (acknowledged: number, recorded: number) => void;
  /** An upload error the client retries by itself (a dropped connection): for a status line, not for the user. */
  onRetry?: (error: Error) => void;
  /** An error that stops the upload (the grant refused, the job failed on bad data); the recording goes on locally. */
  onError?: (error: Error) => void;
  /** A blob every this many ms (the latency of the live transcript, and the most a crash can lose). */
  timesliceMs?: number;
  /** Speech needs little: 32 kbit/s Opus is 14 MB an hour. */
  audioBitsPerSecond?: number;
  /** Bytes per PATCH: tus sends a chunk once this much is recorded (8 KB: about 2 s at 32 kbit/s). */
  chunkSize?: number;
  /** Keep the blobs in IndexedDB after the upload ends (for `localRecording`); by default they are deleted. */
  keepLocalRecording?: boolean;
  /** The microphone; by default getUserMedia({audio: MEETING_AUDIO}). */
  stream?: MediaStream;
}

/**
 * The microphone as a meeting recorder wants it: the room as it sounds. The browser's defaults are a call's:
 * echo cancellation removes what the loudspeakers play (the remote participants, whose words the minutes need),
 * and noise suppression and automatic gain reshape the voice, which costs Whisper accuracy rather than buying it.
 */
export const MEETING_AUDIO: MediaTrackConstraints = {
  echoCancellation: false,
  noiseSuppression: false,
  autoGainControl: false,
  channelCount: 1,
};

export interface LiveRecording {
  /** The job's id once known. */
  readonly jobId: string | null;
  /** Stop recording; resolves with the job's id once the server has every byte (the transcript follows). */
  stop(): Promise<string>;
  /** Leave the page's work (a test's reload, a route change) without ending the upload: recordLive resumes it. */
  detach(): void;
}

const DB_NAME = "pilotys-live";
const CHUNKS = "chunks";
const MEETINGS = "meetings";
const MIME_TYPE = "audio/webm;codecs=opus";
// After tus's own retries, the upload starts again (resumed at the server's offset) this long after an error.
const RESTART_DELAY_MS = 5000;
// Ask for a new grant this long before the current one expires (a meeting outlasts a grant).
const GRANT_MARGIN_MS = 60_000;

function fingerprintOf(meetingId: string): string {
  return `pilotys-live-${meetingId}`;
}

function request<T>(r: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

/** The meeting's blobs in IndexedDB: [meetingId, seq] -> Blob, and per meeting whether recording has stopped. */
class LocalStore {
  private constructor(private readonly db: IDBDatabase) {}

  static async open(): Promise<LocalStore> {
    const opening = indexedDB.open(DB_NAME, 1);
    opening.onupgradeneeded = () => {
      opening.result.createObjectStore(CHUNKS);
      opening.result.createObjectStore(MEETINGS);
    };
    return new LocalStore(await request(opening));
  }

  private store(name: string, mode: IDBTransactionMode): IDBObjectStore {
    return this.db.transaction(name, mode).objectStore(name);
  }

  put(meetingId: string, seq: number, blob: Blob): Promise<IDBValidKey> {
    return request(this.store(CHUNKS, "readwrite").put(blob, [meetingId, seq]));
  }

  get(meetingId: string, seq: number): Promise<Blob | undefined> {
    return request(this.store(CHUNKS, "readonly").get([meetingId, seq]) as IDBRequest<Blob | undefined>);
  }

  count(meetingId: string): Promise<number> {
    return request(this.store(CHUNKS, "readonly").count(IDBKeyRange.bound([meetingId, 0], [meetingId, Infinity])));
  }

  async stopped(meetingId: string): Promise<boolean> {
    return (await request(this.store(MEETINGS, "readonly").get(meetingId))) === "stopped";
  }

  markStopped(meetingId: string): Promise<IDBValidKey> {
    return request(this.store(MEETINGS, "readwrite").put("stopped", meetingId));
  }

  async clear(meetingId: string): Promise<void> {
    await request(this.store(CHUNKS, "readwrite").delete(IDBKeyRange.bound([meetingId, 0], [meetingId, Infinity])));
    await request(this.store(MEETINGS, "readwrite").delete(meetingId));
  }
}

/**
 * What the page knows of the meeting's recording: the blobs stored so far (where each ends, in bytes), stopped
 * or not; and the recording as tus reads it (tus-js-client's file source, given through its `fileReader` option):
 * any byte range straight from IndexedDB, so that a resumed upload starts at the server's offset without
 * reading what came before; a range not yet recorded waits for it, until the recording stops.
 */
class Recording {
  ends: number[] = [];
  stopped = false;
  readonly size = 0; // unused: the length is deferred (tus reads it only when it is not)
  private waiters: Array<() => void> = [];

  constructor(readonly store: LocalStore, readonly meetingId: string) {}

  get recordedBytes(): number {
    return this.ends.at(-1) ?? 0;
  }

  changed(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  added(size: number): void {
    this.ends.push(this.recordedBytes + size);
    this.notify();
  }

  notify(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }

  async slice(start: number, end: number): Promise<{ value: Blob | null; done: boolean }> {
    while (this.recordedBytes < end && !this.stopped) await this.changed();
    const stop = Math.min(end, this.recordedBytes);
    if (start >= stop) return { value: null, done: this.stopped };
    const parts: Blob[] = [];
    let first = this.ends.findIndex((blobEnd) => blobEnd > start);
    const firstStart = first > 0 ? this.ends[first - 1] : 0;
    for (let seq = first; seq < this.ends.length && (seq ? this.ends[seq - 1] : 0) < stop; seq++) {
      const blob = await this.store.get(this.meetingId, seq);
      if (!blob) throw new Error(`the recording's blob ${seq} is missing from IndexedDB`);
      parts.push(blob);
    }
    first = start - firstStart;
    return { value: new Blob(parts).slice(first, first + stop - start), done: false };
  }

  close(): void {}
}

/** The meeting's blobs kept in IndexedDB, concatenated (what was recorded, every session of it). */
export async function localRecording(meetingId: string): Promise<Blob> {
  const store = await LocalStore.open();
  const parts: Blob[] = [];
  const count = await store.count(meetingId);
  for (let seq = 0; seq < count; seq++) {
    const blob = await store.get(meetingId, seq);
    if (blob) parts.push(blob);
  }
  return new Blob(parts, { type: "audio/webm" });
}

/** Record a meeting live; call it again after a reload with the same meetingId to go on with the same job. */
export async function recordLive(options: RecordLiveOptions): Promise<LiveRecording> {
  const {
    meetingId,
    timesliceMs = 1000,
    audioBitsPerSecond = 32_000,
    chunkSize = 8 * 1024,
  } = options;
  const store = await LocalStore.open();
  const recording = new Recording(store, meetingId);
  const stored = await store.count(meetingId);
  for (let seq = 0; seq < stored; seq++) recording.added((await store.get(meetingId, seq))?.size ?? 0);
  recording.stopped = await store.stopped(meetingId);

  let jobId: string | null = null;
  let grant: UploadGrant | null = null;
  let upload: Upload | null = null;
  let events: EventSource | null = null;
  let lastEventId = "";
  let outcomeSeen = false;
  let detached = false;
  let finished: { resolve: (id: string) => void; reject: (e: Error) => void } | null = null;
  const done = new Promise<string>((resolve, reject) => (finished = { resolve, reject }));
  done.catch(() => undefined); // reported through onError too; stop() hands it on

  async function currentGrant(): Promise<UploadGrant> {
    if (!grant || Date.parse(grant.expiresAt) - Date.now() < GRANT_MARGIN_MS) grant = await options.getGrant(meetingId);
    return grant;
  }

  function followEvents(id: string): void {
    if (events || detached || outcomeSeen) return;
    const url = new URL(options.eventsUrl(id), location.href);
    if (lastEventId) url.searchParams.set("last_event_id", lastEventId);
    const source = (events = new EventSource(url));
    source.addEventListener("segment", (e) => {
      const message = e as MessageEvent<string>;
      lastEventId = message.lastEventId || lastEventId;
      options.onSegment?.(JSON.parse(message.data) as LiveSegment);
    });
    for (const outcome of ["succeeded", "failed", "cancelled"] as const) {
      source.addEventListener(`job.${outcome}`, (e) => {
        outcomeSeen = true;
        source.close();
        options.onOutcome?.(outcome, JSON.parse((e as MessageEvent<string>).data));
      });
    }
    source.onerror = () => {
      // EventSource reconnects by itself after a network error; an HTTP error (the PILOTYS route could not
      // reach the server) closes it for good: open a new one that resumes after the last event seen.
      if (source.readyState !== EventSource.CLOSED) return;
      events = null;
      setTimeout(() => followEvents(id), RESTART_DELAY_MS);
    };
  }

  function noteJob(res: HttpResponse): void {
    const id = res.getHeader("Whisper-Job-Id");
    if (id && id !== jobId) {
      jobId = id;
      options.onJob?.(id);
      followEvents(id);
    }
  }

  async function startUpload(): Promise<void> {
    if (detached) return;
    let first: UploadGrant;
    try {
      first = await currentGrant();
    } catch (error) {
      options.onRetry?.(error as Error);
      setTimeout(() => void startUpload(), RESTART_DELAY_MS);
      return;
    }
    // The data comes from `fileReader` (the recording in IndexedDB); tus wants a file all the same.
    const current = (upload = new Upload(new Blob([], { type: "audio/webm" }), {
      endpoint: first.uploadUrl,
      fileReader: { openFile: async () => recording },
      uploadLengthDeferred: true,
      chunkSize,
      metadata: { filename: `meeting-${meetingId}.webm`, filetype: "audio/webm" },
      // One meeting, one upload: found again after a reload or a crash by the meeting, not by a file's name.
      fingerprint: async () => fingerprintOf(meetingId),
      storeFingerprintForResuming: true,
      removeFingerprintOnSuccess: true,
      retryDelays: [0, 1000, 3000, 5000],
      async onBeforeRequest(req: HttpRequest) {
        req.setHeader("Authorization", `Bearer ${(await currentGrant()).token}`);
      },
      onAfterResponse(_req: HttpRequest, res: HttpResponse) {
        noteJob(res);
      },
      onShouldRetry(error: DetailedError) {
        const status = error.originalResponse?.getStatus() ?? 0;
        if (status === 401) grant = null; // the grant expired: the next request asks PILOTYS for another
        options.onRetry?.(error);
        return status === 0 || status === 401 || status === 409 || status === 423 || status === 429 || status >= 500;
      },
      onChunkComplete(_size: number, accepted: number) {
        options.onProgress?.(accepted, recording.recordedBytes);
      },
      onSuccess() {
        if (current !== upload) return;
        finished?.resolve(jobId ?? "");
      },
      onError(error: Error) {
        if (current !== upload || detached) return;
        const status = (error as DetailedError).originalResponse?.getStatus() ?? 0;
        if (status >= 400 && status < 500 && ![401, 409, 423, 429].includes(status)) {
          options.onError?.(error); // the server refuses for good (403 upload finished, 410, 413, 422): say so
          finished?.reject(error);
          return;
        }
        options.onRetry?.(error);
        setTimeout(() => void startUpload(), RESTART_DELAY_MS);
      },
    }));
    const previous: PreviousUpload[] = await current.findPreviousUploads();
    if (previous.length) current.resumeFromPreviousUpload(previous[previous.length - 1]);
    current.start();
  }

  let recorder: MediaRecorder | null = null;
  let stream: MediaStream | null = null;
  if (!recording.stopped) {
    stream = options.stream ?? (await navigator.mediaDevices.getUserMedia({ audio: MEETING_AUDIO }));
    recorder = new MediaRecorder(stream, { mimeType: MIME_TYPE, audioBitsPerSecond });
    let pending = Promise.resolve();
    recorder.ondataavailable = (e: BlobEvent) => {
      if (!e.data.size) return;
      // In order, each blob on disk before tus may read it.
      pending = pending.then(async () => {
        await store.put(meetingId, recording.ends.length, e.data);
        recording.added(e.data.size);
      });
    };
    recorder.onstop = () => {
      pending = pending.then(async () => {
        stream?.getTracks().forEach((track) => track.stop());
        if (detached) return;
        await store.markStopped(meetingId);
        recording.stopped = true;
        recording.notify();
      });
    };
    recorder.start(timesliceMs);
  }
  void startUpload();

  return {
    get jobId() {
      return jobId;
    },
    async stop() {
      if (recorder && recorder.state !== "inactive") recorder.stop();
      const id = await done;
      if (!options.keepLocalRecording) await store.clear(meetingId);
      return id;
    },
    detach() {
      detached = true;
      if (recorder && recorder.state !== "inactive") recorder.stop();
      events?.close();
      void upload?.abort();
    },
  };
}
