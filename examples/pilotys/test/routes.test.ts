// The route handlers when pilotys-whisper cannot be reached: an answer the browser can act on, not a hang.
import { describe, it } from "node:test";
import assert from "node:assert/strict";

import { createJobEventsHandler, createUploadGrantHandler, type WhisperConfig } from "../src/whisper.js";
import { freePort } from "./harness.js";

describe("PILOTYS routes with the server unreachable", () => {
  it("answer 502, so that recordLive asks again later", async () => {
    const config: WhisperConfig = { apiUrl: `http://127.0.0.1:${await freePort()}`, apiKey: "k".repeat(24) }; // nothing listens
    const grant = await createUploadGrantHandler({ live: true, config })(new Request("https://app.example/api/live", {
      method: "POST", body: JSON.stringify({ meetingId: "m-1" }), headers: { "Content-Type": "application/json" } }));
    assert.equal(grant.status, 502);
    assert.equal(((await grant.json()) as { code: string }).code, "server_unreachable");
    const events = await createJobEventsHandler({ config })(new Request("https://app.example/api/whisper/jobs/job_1/events"));
    assert.equal(events.status, 502);
  });
});
