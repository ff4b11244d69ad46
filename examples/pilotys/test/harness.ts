// What the client's tests share: the real service as a process (real model), free ports, waiting for a state.
import { spawn, type ChildProcess } from "node:child_process";
import { createServer as createNetServer, type AddressInfo } from "node:net";
import { homedir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = resolve(fileURLToPath(new URL(".", import.meta.url)), "../../../..");
export const ASSETS = process.env.PILOTYS_WHISPER_ASSETS ?? join(homedir(), ".cache/pilotys-whisper/assets");
export const PYTHON = process.env.WHISPER_SERVICE_PYTHON ?? "python3";

export async function freePort(): Promise<number> {
  return new Promise((done) => {
    const server = createNetServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address() as AddressInfo;
      server.close(() => done(port));
    });
  });
}

export async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 120_000,
  log: () => string = () => ""): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe().catch(() => undefined);
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}\n${log()}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

export interface Service {
  url: string;
  process: ChildProcess;
  log(): string;
  stop(): Promise<void>;
}

/** pilotys-whisper from this tree on a free port with the `base` model; `env` adds or overrides settings. */
export async function startService(env: Record<string, string>): Promise<Service> {
  const port = await freePort();
  let log = "";
  const child = spawn(PYTHON, ["-m", "pilotys_whisper", "serve"], {
    env: {
      ...process.env,
      PYTHONPATH: join(ROOT, "service", "src"),
      WHISPER_MODEL: join(ASSETS, "models", "base"),
      WHISPER_PORT: String(port),
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  child.stdout?.on("data", (d) => (log += d));
  child.stderr?.on("data", (d) => (log += d));
  const url = `http://127.0.0.1:${port}`;
  await until("the service to be ready", async () => ((await fetch(`${url}/ready`)).ok ? true : undefined),
    120_000, () => log);
  return {
    url,
    process: child,
    log: () => log,
    async stop() {
      if (child.exitCode === null) {
        child.kill("SIGTERM");
        await new Promise((done) => child.once("exit", done));
      }
    },
  };
}
