import { useMutation } from "@tanstack/react-query";
import { useState, type FormEvent } from "react";
import type { Session } from "../api";
import { ErrorNotice } from "./ErrorNotice";

/** Email and password, sent with `logIn`; `onDone` runs after a login
 * succeeded. The tenant and the operator login pages share it. */
export function LoginForm({
  logIn,
  onDone,
}: {
  logIn: (email: string, password: string) => Promise<Session>;
  onDone: () => void;
}) {
  const [email, setEmail] = useState("");
  const [password, setPassword] = useState("");
  const login = useMutation({
    mutationFn: () => logIn(email.trim(), password),
    onSuccess: onDone,
  });
  const submit = (event: FormEvent) => {
    event.preventDefault();
    login.mutate();
  };
  return (
    <form onSubmit={submit} className="form">
      <label>
        Email
        <input
          type="email"
          name="email"
          autoComplete="username"
          required
          maxLength={254}
          value={email}
          onChange={(event) => setEmail(event.target.value)}
        />
      </label>
      <label>
        Password
        <input
          type="password"
          name="password"
          autoComplete="current-password"
          required
          maxLength={128}
          value={password}
          onChange={(event) => setPassword(event.target.value)}
        />
      </label>
      {login.error && <ErrorNotice error={login.error} title="Login failed" />}
      <button type="submit" className="button" disabled={login.isPending}>
        {login.isPending ? "Logging in…" : "Log in"}
      </button>
    </form>
  );
}
