// recordLive() in a real headless Chromium (Debian's), its fake microphone fed from a synthesized French meeting,
// streaming to the real service (real model) through a proxy that the test cuts for 15 s, the page reloaded once.
// By default about 45 s of recording (part of `make test`); PILOTYS_LIVE_BROWSER_FULL=1 (`make test-browser`):
// the 3 minutes.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { Socket } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { chromium, type Browser, type Page } from "playwright-core";

import { createJobEventsHandler, createUploadGrantHandler, getResult, type WhisperConfig } from "../src/whisper.js";
import { PYTHON, ROOT, freePort, startService, until, type Service } from "./harness.js";

const CHROMIUM = process.env.PILOTYS_CHROMIUM ?? "/usr/bin/chromium";
const FULL = process.env.PILOTYS_LIVE_BROWSER_FULL === "1";
const RECORD_S = FULL ? 180 : 45; // wall time recorded, both sessions of the page together
const CUT_S = 15;
const KEY = "pilotys-live-test-key-0123456789";
// The page's files: the compiled client (dist/src) and tus-js-client's browser build, as Next.js would bundle them.
const PACKAGE = resolve(fileURLToPath(new URL(".", import.meta.url)), "../..");
const work = mkdtempSync(join(tmpdir(), "pilotys-live-"));

// A meeting in French, one line after another with 2.5 s of silence between them: the page reloads and stops in
// those silences, so the words the recording holds are known (the lines that ended before).
const LINES = [
  "Bonjour à tous, nous commençons la réunion de ce matin.",
  "Le premier point concerne le budget du projet.",
  "Les dépenses du trimestre sont conformes aux prévisions.",
  "Nous devons encore valider le contrat du fournisseur.",
  "Claire présentera le planning de la semaine prochaine.",
  "La livraison du prototype est prévue pour le mois de mars.",
  "Les tests sur le terrain commenceront juste après.",
  "Il faut réserver une salle pour la formation des équipes.",
  "Le deuxième point porte sur le recrutement.",
  "Deux candidats seront reçus en entretien jeudi.",
  "Le troisième point concerne la sécurité du bâtiment.",
  "Les badges seront remplacés avant la fin du mois.",
  "Merci de signaler toute anomalie au service technique.",
  "Passons maintenant aux questions diverses.",
  "La cantine fermera plus tôt vendredi après-midi.",
  "Le prochain comité aura lieu dans deux semaines.",
  "Nous enverrons le compte rendu à tous les participants.",
  "Pensez à mettre à jour vos tâches dans le tableau.",
  "Le client attend notre réponse avant lundi.",
  "Nous préparerons une proposition chiffrée cette semaine.",
  "Marc se charge de contacter le service juridique.",
  "Les congés d'été doivent être posés avant avril.",
  "La nouvelle imprimante est installée au deuxième étage.",
  "Je vous remercie pour votre attention.",
  "Le site internet sera mis à jour la semaine prochaine.",
  "Les chiffres de vente seront présentés au conseil.",
  "Nous avons reçu trois nouvelles demandes de devis.",
  "La réunion avec les partenaires est reportée à juin.",
  "Sophie organise le séminaire de rentrée.",
  "Le rapport annuel doit être relu avant sa publication.",
  "Chacun peut proposer des idées pour améliorer le service.",
  "Je vous remercie pour votre attention.",
  "La séance est levée, bonne journée à tous.",
];

interface Meeting {
  wav: string;
  /** The meeting's two halves: the one recorded before the reload, the one after; each its lines and seconds. */
  parts: Array<{ lines: string[]; seconds: number }>;
}

/**
 * The meeting as a 48 kHz WAV for Chromium's fake microphone (service/tests/speakers.py's voice, as the French
 * test recording: fr+m3 at 125 words a minute), its second half first. Chromium plays the file from its start
 * for each page that opens the microphone: the first page listens through the second half before it records,
 * the reloaded page records it, so the recording holds the meeting in order, each line once.
 */
function synthesize(seconds: number): Meeting {
  const wav = join(work, "meeting.wav");
  const script = `
import json, subprocess, sys
from pathlib import Path
import numpy as np
from speakers import RATE, Line, Voice, assemble, speak, write_wav
lines, half = json.loads(sys.argv[2]), float(sys.argv[3])
voice = [Voice("A", "m3", speed=125)]
parts = []
for _ in range(2):
    taken, seconds = [], 1.0  # assemble() puts 0.5 s of silence before and after
    while lines and seconds < half:
        taken.append(lines.pop(0))
        seconds += 2.5 + speak(taken[-1], voice[0]).shape[0] / RATE
    parts.append((taken, assemble(voice, [Line("A", t, gap=2.5) for t in taken])))
write_wav(Path(sys.argv[1] + ".16k.wav"), np.concatenate([parts[1][1].audio, parts[0][1].audio]))
subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", sys.argv[1] + ".16k.wav", "-ar", "48000",
                sys.argv[1]], check=True)
print(json.dumps([{"lines": taken, "seconds": meeting.duration} for taken, meeting in parts]))
`;
  const out = execFileSync(PYTHON, ["-c", script, wav, JSON.stringify(LINES), String(seconds / 2)],
    { env: { ...process.env, PYTHONPATH: join(ROOT, "service", "tests") } });
  return { wav, parts: JSON.parse(out.toString()) };
}

/** The word error rate of a transcript against its reference (the service tests' normalization and jiwer). */
function wer(reference: string, hypothesis: string): number {
  const out = execFileSync(PYTHON, ["-c", "import sys; from conftest import wer; print(wer(sys.argv[1], sys.argv[2]))",
    reference, hypothesis],
    { env: { ...process.env, PYTHONPATH: [join(ROOT, "service", "tests"), join(ROOT, "service", "src")].join(":") } });
  return Number(out.toString());
}

/** A Node.js request as a fetch Request, and a Response written back as it streams (Server-Sent Events). */
async function handle(req: IncomingMessage, res: ServerResponse, handler: (r: Request) => Promise<Response>) {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  const aborted = new AbortController();
  res.on("close", () => aborted.abort());
  const request = new Request(`http://127.0.0.1${req.url}`, {
    method: req.method,
    headers: req.headers as Record<string, string>,
    body: chunks.length ? Buffer.concat(chunks) : undefined,
    signal: aborted.signal,
  });
  let response: Response;
  try {
    response = await handler(request);
  } catch (error) {
    response = new Response(String(error), { status: 500 }); // as Next.js answers a route that throws
  }
  res.writeHead(response.status, Object.fromEntries(response.headers));
  if (!response.body) return res.end();
  const reader = response.body.getReader();
  try {
    for (let part = await reader.read(); !part.done; part = await reader.read()) res.write(part.value);
  } catch {
    // the upstream stream broke off (the cut): the browser's EventSource reconnects
  }
  res.end();
}

/**
 * Between the page (and PILOTYS's routes) and the service: forwards HTTP as it comes, keeps what each PATCH that
 * the service acknowledged (204) carried at its Upload-Offset, and can be cut (every connection dropped, the port
 * refusing) and restored on the same port.
 */
class CuttableProxy {
  readonly acknowledged: Array<{ offset: number; bytes: Buffer }> = [];
  private server: Server | null = null;
  private sockets = new Set<Socket>();

  constructor(readonly port: number, private readonly target: string) {}

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  async open(): Promise<void> {
    const server = (this.server = createServer((req, res) => this.forward(req, res)));
    server.on("connection", (socket) => {
      this.sockets.add(socket);
      socket.on("close", () => this.sockets.delete(socket));
    });
    await new Promise<void>((done) => server.listen(this.port, "127.0.0.1", done));
  }

  async cut(): Promise<void> {
    const server = this.server;
    if (!server) return;
    this.server = null;
    for (const socket of this.sockets) socket.destroy();
    await new Promise((done) => server.close(done));
  }

  private forward(req: IncomingMessage, res: ServerResponse): void {
    trace(`proxy ${req.method} ${req.url} offset=${req.headers["upload-offset"] ?? "-"}`);
    const target = new URL(req.url ?? "/", this.target);
    const body: Buffer[] = [];
    const upstream = httpRequest(target, { method: req.method, headers: req.headers }, (answer) => {
      if (req.method === "PATCH" && answer.statusCode === 204) {
        this.acknowledged.push({ offset: Number(req.headers["upload-offset"]), bytes: Buffer.concat(body) });
      }
      trace(`proxy ${req.method} ${req.url} -> ${answer.statusCode}`);
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      answer.pipe(res);
      res.on("close", () => answer.destroy());
    });
    upstream.on("error", () => res.destroy());
    req.on("data", (chunk: Buffer) => body.push(chunk));
    req.pipe(upstream);
    res.on("close", () => upstream.destroy());
  }

  /** What the service acknowledged, laid at its offsets: throws on a gap, or on a re-sent byte that differs. */
  assembled(): Buffer {
    let out = Buffer.alloc(0);
    for (const { offset, bytes } of [...this.acknowledged].sort((a, b) => a.offset - b.offset)) {
      assert.ok(offset <= out.length, `a gap: bytes ${out.length}-${offset} were never acknowledged`);
      const overlap = out.subarray(offset, offset + bytes.length);
      assert.ok(overlap.equals(bytes.subarray(0, overlap.length)), `bytes at ${offset} acknowledged twice, different`);
      out = Buffer.concat([out, bytes.subarray(overlap.length)]);
    }
    return out;
  }
}

const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>PILOTYS meeting</title>
<script src="/vendor/tus.min.js"></script>
<script type="importmap">{"imports": {"tus-js-client": "/vendor/tus-js-client.js"}}</script>
<ol id="transcript"></ol>
<script type="module">
import { MEETING_AUDIO, recordLive, localRecording } from "/dist/src/live.js";
const shown = document.getElementById("transcript");
window.errors = [];
window.startMeeting = async (meetingId, listenFirstMs) => {
  let stream;
  if (listenFirstMs) {
    stream = await navigator.mediaDevices.getUserMedia({ audio: MEETING_AUDIO });
    await new Promise((done) => setTimeout(done, listenFirstMs));
  }
  window.recording = await recordLive({
    meetingId,
    stream,
    async getGrant(id) {
      const response = await fetch("/api/live", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ meetingId: id }) });
      if (!response.ok) throw new Error("no grant: " + response.status);
      return response.json();
    },
    eventsUrl: (jobId) => "/api/whisper/jobs/" + encodeURIComponent(jobId) + "/events",
    onSegment(segment) {
      const item = document.createElement("li");
      item.dataset.id = String(segment.id);
      item.textContent = segment.text.trim();
      shown.append(item);
    },
    onJob: (jobId) => (window.jobId = jobId),
    onOutcome: (outcome) => (window.outcome = outcome),
    onRetry: (error) => {
      // Counted across the reload (the full run's reload comes after the cut).
      sessionStorage.setItem("retries", String(Number(sessionStorage.getItem("retries") ?? 0) + 1));
      console.log("retry: " + error);
    },
    onProgress: (acknowledged, recorded) => console.log("progress " + acknowledged + " / " + recorded),
    onError: (error) => window.errors.push(String(error)),
    keepLocalRecording: true,
  });
};
window.stopMeeting = async (meetingId) => {
  const jobId = await window.recording.stop();
  const bytes = new Uint8Array(await (await localRecording(meetingId)).arrayBuffer());
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return { jobId, recording: btoa(binary) };
};
</script>
`;

const STATIC: Record<string, [string, string]> = {
  "/vendor/tus.min.js": [join(PACKAGE, "node_modules/tus-js-client/dist/tus.min.js"), "text/javascript"],
};

let service: Service;
let proxy: CuttableProxy;
let app: Server;
let appUrl: string;
let browser: Browser;

before(async () => {
  const appPort = await freePort();
  appUrl = `http://127.0.0.1:${appPort}`;
  writeFileSync(join(work, "keys"), `${KEY} label=pilotys\n`);
  service = await startService({
    WHISPER_API_KEYS_FILE: join(work, "keys"),
    WHISPER_STATE_DIR: join(work, "state"),
    WHISPER_CORS_ORIGINS: appUrl,
  });
  proxy = new CuttableProxy(await freePort(), service.url);
  await proxy.open();
  // PILOTYS's server side: its routes reach the service through the proxy too (the whole network is cut).
  const config: WhisperConfig = { apiUrl: proxy.url, apiKey: KEY };
  const grantRoute = createUploadGrantHandler({ live: true, language: "fr", expiresIn: 3600, config });
  const eventsRoute = createJobEventsHandler({ config });
  app = createServer((req, res) => {
    const path = new URL(req.url ?? "/", appUrl).pathname;
    if (path === "/api/live" && req.method === "POST") return void handle(req, res, grantRoute);
    if (/^\/api\/whisper\/jobs\/[^/]+\/events$/.test(path)) return void handle(req, res, eventsRoute);
    if (path === "/") {
      res.writeHead(200, { "Content-Type": "text/html; charset=utf-8" });
      return void res.end(PAGE);
    }
    if (path === "/vendor/tus-js-client.js") {
      // tus-js-client's browser build sets window.tus; the module the client imports hands it on.
      res.writeHead(200, { "Content-Type": "text/javascript" });
      return void res.end("const { Upload, DetailedError, isSupported, canStoreURLs, defaultOptions } = window.tus;\n"
        + "export { Upload, DetailedError, isSupported, canStoreURLs, defaultOptions };\n");
    }
    const file = STATIC[path] ?? (/^\/dist\/src\/[a-z]+\.js$/.test(path)
      ? [join(PACKAGE, path), "text/javascript"] : undefined);
    if (file && existsSync(file[0])) {
      res.writeHead(200, { "Content-Type": file[1] });
      return void res.end(readFileSync(file[0]));
    }
    res.writeHead(404).end();
  });
  await new Promise<void>((done) => app.listen(appPort, "127.0.0.1", done));
});

after(async () => {
  await browser?.close();
  app?.close();
  await proxy?.cut();
  await service?.stop();
  rmSync(work, { recursive: true, force: true });
});

async function launch(wav: string): Promise<Page> {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-background-networking", "--use-fake-device-for-media-stream",
      "--use-fake-ui-for-media-stream", `--use-file-for-fake-audio-capture=${wav}`],
  });
  const page = await browser.newPage();
  page.on("pageerror", (error) => console.error("page error:", error));
  page.on("console", (message) => trace(`page ${message.type()}: ${message.text()}`));
  await page.goto(appUrl);
  return page;
}

function trace(line: string): void {
  if (process.env.PILOTYS_LIVE_BROWSER_TRACE) console.error(`${new Date().toISOString().slice(11, 23)} ${line}`);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe(`a live meeting recorded in Chromium (${RECORD_S} s)`, () => {
  it("reaches the service whole through a 15 s cut and a reload, with its segments shown live", async () => {
    const meeting = synthesize(RECORD_S);
    const [first, second] = meeting.parts;
    const page = await launch(meeting.wav);
    const meetingId = "live-1";
    // The first page records the first half (the file's second part: it listens through the first part, and
    // starts in the silence between the two); the cut starts a third of the way into the meeting; the page
    // reloads once the first half is recorded (during the cut in the short run, after it in the full one).
    const listenFirstMs = (second.seconds - 0.3) * 1000;
    await page.evaluate(([id, ms]) => (window as any).startMeeting(id, ms), [meetingId, listenFirstMs] as const);
    const started = Date.now();
    const at = (seconds: number) => sleep(Math.max(0, started + seconds * 1000 - Date.now()));
    const cutAt = RECORD_S * 0.35;

    await at(cutAt);
    await proxy.cut();
    trace("cut");
    const restore = at(cutAt + CUT_S).then(() => proxy.open());
    await at(first.seconds + 0.3);
    // A reload, as a tab crash or an impatient click: whatever the page held in memory is gone.
    trace("reload");
    await page.reload();
    await page.evaluate(([id]) => (window as any).startMeeting(id, 0), [meetingId] as const);
    const restarted = Date.now();
    await restore;
    await sleep(Math.max(0, restarted + second.seconds * 1000 - Date.now()));
    trace("stop");
    const { jobId, recording } = (await page.evaluate((id) => (window as any).stopMeeting(id), meetingId)) as
      { jobId: string; recording: string };
    assert.ok(jobId, "the page knows its job");
    assert.ok(await page.evaluate(() => Number(sessionStorage.getItem("retries"))) > 0, "the cut was felt");
    assert.deepEqual(await page.evaluate(() => (window as any).errors), []);

    // Every byte the page recorded, in both sessions, and nothing else, acknowledged once at its place.
    const recorded = Buffer.from(recording, "base64");
    const uploaded = proxy.assembled();
    assert.equal(uploaded.length, recorded.length);
    assert.ok(uploaded.equals(recorded), "the service holds what the page recorded, byte for byte");

    // The transcript: shown live from the event stream, each segment once, the same as the job's result.
    await page.waitForFunction(() => (window as any).outcome !== undefined, null, { timeout: 1_200_000 });
    assert.equal(await page.evaluate(() => (window as any).outcome), "succeeded");
    const result = JSON.parse(await getResult(jobId, "verbose_json", { apiUrl: service.url, apiKey: KEY })) as
      { text: string; duration: number; segments: Array<{ id: number; text: string }> };
    const shown = await page.$$eval("#transcript li", (items) => items.map((li) => [Number((li as HTMLElement).dataset.id),
      li.textContent ?? ""] as [number, string]));
    assert.deepEqual(shown, result.segments.map((s) => [s.id, s.text.trim()]));

    const reference = [...first.lines, ...second.lines].join(" ");
    const error = wer(reference, result.text);
    const recordedS = first.seconds + second.seconds;
    console.log(`live meeting: ${recorded.length} bytes in ${proxy.acknowledged.length} PATCHes, sessions `
      + `${first.seconds.toFixed(1)} + ${second.seconds.toFixed(1)} s, decoded ${result.duration.toFixed(1)} s, `
      + `WER ${error.toFixed(3)}\n${result.text}`);
    // The bytes above prove the upload whole; these prove the transcript is the whole meeting's, in order, once.
    // Its length: both sessions decoded one after the other (a session lost or sent twice is 24 s off).
    assert.ok(Math.abs(result.duration - recordedS) <= 3, `decoded ${result.duration} s of ${recordedS} s recorded`);
    // Its order: the meeting's first line at the start, its first word heard once, as a resume that sent the
    // recording again from its start would not.
    const words = (text: string) => text.toLowerCase().normalize("NFD").replace(/[^a-z ]+/g, " ").split(/\s+/);
    assert.ok(words(result.segments[0].text).includes("bonjour"), result.segments[0].text);
    assert.equal(result.text.toLowerCase().match(/bonjour/g)?.length, 1, result.text);
    // Its words: Whisper base on espeak-ng's voice through Chromium's 32 kbit/s Opus measured 0.51-0.68 against
    // the reference (2026-12-02; the same file's WAV 0.21, its Opus from ffmpeg 0.42-0.56: the voice, not the
    // path), so this bound tells speech from noise or silence, not accuracy; the service tests measure that.
    assert.ok(error <= 0.8, `WER ${error}: ${result.text}\nreference: ${reference}`);
  });
});
