// The terminal WebSocket: binary frames carry the terminal's bytes both
// ways; a text frame {"type":"resize","cols","rows"} resizes it. A browser
// cannot set an Authorization header on a WebSocket, so the access token
// travels as a second subprotocol (`keel.bearer.<token>`) next to
// `keel.terminal.v1`, which the api picks.

import { api } from "./client";
import { getSession } from "./session";

export interface TerminalHandlers {
  onOpen(): void;
  onData(bytes: Uint8Array): void;
  /** `clean` when the server ended the session with a reason. */
  onClose(reason: string, clean: boolean): void;
}

export interface TerminalConnection {
  send(text: string): void;
  resize(cols: number, rows: number): void;
  close(): void;
}

const encoder = new TextEncoder();

/** Opens a terminal on a running allocation. Fails (as an ApiError) when
 * the allocation cannot be read; a refused upgrade arrives as onClose.
 * Returns null, opening nothing, if `stillWanted` says no by the time the
 * socket would open (the user left or reconnected meanwhile): every
 * session is real and audited. */
export async function openTerminal(
  projectId: string,
  allocationId: string,
  handlers: TerminalHandlers,
  stillWanted: () => boolean,
): Promise<TerminalConnection | null> {
  // An authenticated read first: it refreshes an expired token, so the
  // upgrade carries a valid one (its own 401 would be invisible here).
  await api.allocations.allocationGet({ projectId, allocationId });
  if (!stillWanted()) {
    return null;
  }
  const token = getSession()?.accessToken ?? "";
  const url = new URL(
    `/v1/projects/${encodeURIComponent(projectId)}/allocations/${encodeURIComponent(allocationId)}/terminal`,
    window.location.href,
  );
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(url, ["keel.terminal.v1", `keel.bearer.${token}`]);
  socket.binaryType = "arraybuffer";
  let opened = false;
  let closedHere = false;
  socket.onopen = () => {
    opened = true;
    handlers.onOpen();
  };
  socket.onmessage = (event: MessageEvent) => {
    if (event.data instanceof ArrayBuffer) {
      handlers.onData(new Uint8Array(event.data));
    }
  };
  socket.onclose = (event: CloseEvent) => {
    if (closedHere) {
      handlers.onClose("you closed the session", true);
    } else if (!opened) {
      handlers.onClose("the terminal could not be opened (the allocation may no longer be running)", false);
    } else {
      handlers.onClose(event.reason || "the connection was lost", event.code === 1000);
    }
  };
  return {
    send(text) {
      if (socket.readyState === WebSocket.OPEN) {
        socket.send(encoder.encode(text));
      }
    },
    resize(cols, rows) {
      if (socket.readyState === WebSocket.OPEN) {
        socket.send(JSON.stringify({ type: "resize", cols, rows }));
      }
    },
    close() {
      closedHere = true;
      socket.close(1000, "closed by the user");
    },
  };
}
