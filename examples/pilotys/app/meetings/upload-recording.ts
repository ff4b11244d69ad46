// In the browser (a client component): ask PILOTYS for a grant, then upload the recording to pilotys-whisper.
import { uploadWithGrant, type UploadGrant } from "../../src/upload.js";

export async function uploadRecording(meetingId: string, recording: Blob): Promise<string> {
  const response = await fetch("/api/transcriptions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ meetingId }),
  });
  if (!response.ok) throw new Error(`no upload grant: ${response.status}`);
  const grant = (await response.json()) as UploadGrant;
  const job = await uploadWithGrant(recording, grant, { filename: `meeting-${meetingId}.webm` });
  return job.id; // the transcript comes to /api/whisper-webhook
}
