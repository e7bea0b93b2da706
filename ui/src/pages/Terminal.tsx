import { useQuery } from "@tanstack/react-query";
import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";
import "@xterm/xterm/css/xterm.css";
import { useCallback, useEffect, useRef, useState } from "react";
import { Link, useParams } from "react-router";
import { api, openTerminal, toApiError, type TerminalConnection } from "../api";
import { ErrorNotice } from "../components/ErrorNotice";
import { PageHeading } from "../components/PageHeading";

type Status = "connecting" | "connected" | "disconnected" | "error";

const STATUS_LABEL: Record<Status, string> = {
  connecting: "Connecting…",
  connected: "Connected",
  disconnected: "Disconnected",
  error: "Could not connect",
};

/** A shell in the allocation's environment, through src/api/terminal.ts.
 * The scrollback stays across reconnects (one xterm for the page's life). */
export function TerminalPage() {
  const { projectId = "", allocationId = "" } = useParams();
  const allocation = useQuery({
    queryKey: ["allocation", projectId, allocationId],
    queryFn: () => api.allocations.allocationGet({ projectId, allocationId }),
  });
  const container = useRef<HTMLDivElement>(null);
  const terminal = useRef<Terminal | null>(null);
  const fit = useRef<FitAddon | null>(null);
  const connection = useRef<TerminalConnection | null>(null);
  const [status, setStatus] = useState<Status>("connecting");
  const [detail, setDetail] = useState<string>("");
  const [failure, setFailure] = useState<unknown>(null);
  // Each connection's events count only while it is the current one (a
  // reconnect closes the previous socket, whose close arrives later).
  const generation = useRef(0);

  const connect = useCallback(async () => {
    const term = terminal.current;
    if (!term) {
      return;
    }
    const mine = ++generation.current;
    const current = () => generation.current === mine;
    connection.current?.close();
    connection.current = null;
    setStatus("connecting");
    setDetail("");
    setFailure(null);
    try {
      const opened = await openTerminal(projectId, allocationId, {
        onOpen: () => {
          if (current()) {
            setStatus("connected");
            connection.current?.resize(term.cols, term.rows);
            term.focus();
          }
        },
        onData: (bytes) => {
          if (current()) {
            term.write(bytes);
          }
        },
        onClose: (reason, clean) => {
          if (current()) {
            setStatus(clean ? "disconnected" : "error");
            setDetail(reason);
            term.write(`\r\n\x1b[2m— ${reason} —\x1b[0m\r\n`);
          }
        },
      }, current);
      if (opened && current()) {
        connection.current = opened;
      } else {
        opened?.close();
      }
    } catch (error) {
      if (current()) {
        setStatus("error");
        setDetail(toApiError(error).message);
        setFailure(error);
      }
    }
  }, [projectId, allocationId]);

  useEffect(() => {
    if (!container.current) {
      return;
    }
    const term = new Terminal({
      cursorBlink: true,
      scrollback: 5000,
      screenReaderMode: true,
      fontFamily: "ui-monospace, SFMono-Regular, Menlo, monospace",
    });
    const fitAddon = new FitAddon();
    term.loadAddon(fitAddon);
    term.open(container.current);
    fitAddon.fit();
    terminal.current = term;
    fit.current = fitAddon;
    const input = term.onData((data) => connection.current?.send(data));
    const onResize = () => {
      fitAddon.fit();
      connection.current?.resize(term.cols, term.rows);
    };
    window.addEventListener("resize", onResize);
    void connect();
    return () => {
      generation.current += 1;
      window.removeEventListener("resize", onResize);
      input.dispose();
      connection.current?.close();
      connection.current = null;
      term.dispose();
      terminal.current = null;
    };
  }, [connect]);

  const name = allocation.data?.name ?? "allocation";
  return (
    <>
      <p className="breadcrumb">
        <Link to={`/projects/${projectId}/allocations/${allocationId}`}>{name}</Link>
      </p>
      <PageHeading>Terminal: {name}</PageHeading>
      <div className="terminal-bar">
        <p role="status" className={`terminal-status terminal-${status}`}>
          {STATUS_LABEL[status]}
          {detail ? ` — ${detail}` : ""}
        </p>
        {(status === "disconnected" || status === "error") && (
          <button type="button" className="button" onClick={() => void connect()}>
            Reconnect
          </button>
        )}
        {status === "connected" && (
          <button type="button" className="button secondary" onClick={() => connection.current?.close()}>
            Disconnect
          </button>
        )}
      </div>
      {failure !== null && <ErrorNotice error={failure} title="The terminal could not be opened" />}
      <div className="terminal" role="region" aria-label={`Terminal of ${name}`}>
        <div className="terminal-screen" ref={container} />
      </div>
      <p className="hint">Sessions are time-limited and audited (who and when, never what is typed).</p>
    </>
  );
}
