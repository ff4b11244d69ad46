"""Live results through Caddy: a job's event stream and OpenAI's streamed transcription reach the client as the
service writes them, not once the response is complete."""

from __future__ import annotations

import json
import os
from pathlib import Path

import requests

ASSETS = Path(os.environ.get("PILOTYS_WHISPER_ASSETS", Path.home() / ".cache" / "pilotys-whisper" / "assets"))
NEWS = ASSETS / "audio" / "news_en_169s.wav"


def test_a_jobs_events_stream_through_caddy_as_they_come(address, api_key, ca_bundle):
    headers = {"Authorization": f"Bearer {api_key}"}
    with open(NEWS, "rb") as f:
        r = requests.post(f"https://{address}/v1/jobs", headers=headers, files={"file": (NEWS.name, f)},
                          data={"language": "en"}, verify=ca_bundle, timeout=60)
    assert r.status_code == 202, r.text
    url = f"https://{address}/v1/jobs/{r.json()['id']}"
    events: list[tuple[str, dict]] = []
    status_at_first_segment = None
    with requests.get(url + "/events", headers=headers, verify=ca_bundle, stream=True, timeout=(10, 300)) as stream:
        assert stream.status_code == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        event = None
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event:
                events.append((event, json.loads(line[len("data: "):])))
                if event == "segment" and status_at_first_segment is None:
                    status_at_first_segment = requests.get(url, headers=headers, verify=ca_bundle,
                                                           timeout=10).json()["status"]
    assert events[-1][0] == "job.succeeded", [e for e, _ in events]
    # Caddy passed the first segment on while the job still ran: it buffers nothing.
    assert status_at_first_segment == "running"
    text = requests.get(url + "/result?format=text", headers=headers, verify=ca_bundle, timeout=10).text
    assert "".join(d["text"] for e, d in events if e == "segment").strip() == text.strip()


def test_a_streamed_transcription_through_caddy(address, api_key, ca_bundle):
    headers = {"Authorization": f"Bearer {api_key}"}
    with open(NEWS, "rb") as f, requests.post(
            f"https://{address}/v1/audio/transcriptions", headers=headers, files={"file": (NEWS.name, f)},
            data={"language": "en", "stream": "true"}, verify=ca_bundle, stream=True, timeout=300) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        payloads = [json.loads(line[len("data: "):]) for line in r.iter_lines(decode_unicode=True) if line]
    assert payloads[-1]["type"] == "transcript.text.done", payloads[-3:]
    assert "".join(p["delta"] for p in payloads[:-1]) == payloads[-1]["text"]
