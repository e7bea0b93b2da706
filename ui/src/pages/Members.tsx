import { useMutation, useQuery, useQueryClient } from "@tanstack/react-query";
import { useState, type FormEvent } from "react";
import { api, newIdempotencyKey, toApiError, type Role } from "../api";
import { ConfirmButton } from "../components/ConfirmButton";
import { ErrorNotice } from "../components/ErrorNotice";
import { TableWrap } from "../components/TableWrap";
import { Loading } from "../components/Loading";
import { PageHeading } from "../components/PageHeading";
import { SecretOnce } from "../components/SecretOnce";
import { useSessionInfo } from "../hooks/useSessionInfo";
import { assignableRoles, canAdminister, canManageOwners } from "../lib/permissions";

const ROLE_LABEL: Record<Role, string> = { owner: "Owner", admin: "Admin", member: "Member", viewer: "Viewer" };

export function MembersPage() {
  const session = useSessionInfo();
  const role = session.data?.role;
  const admin = canAdminister(role);
  return (
    <>
      <PageHeading>Members</PageHeading>
      {session.data && <p className="hint">Everyone in {session.data.tenantName}, and who is invited.</p>}
      <MemberList myRole={role} myUserId={session.data?.userId} />
      {admin && <Invitations myRole={role} />}
      <AcceptInvitation />
    </>
  );
}

function MemberList({ myRole, myUserId }: { myRole: Role | undefined; myUserId: string | undefined }) {
  const queryClient = useQueryClient();
  const members = useQuery({ queryKey: ["members"], queryFn: () => api.members.memberList({ limit: 200 }) });
  const change = useMutation({
    mutationFn: ({ userId, role, version }: { userId: string; role: Role; version: number }) =>
      api.members.memberUpdate({ userId, memberUpdateRequest: { role }, ifMatch: `"${version}"` }),
    onSettled: () => queryClient.invalidateQueries({ queryKey: ["members"] }),
  });
  const remove = useMutation({
    mutationFn: ({ userId, version }: { userId: string; version: number }) =>
      api.members.memberRemove({ userId, ifMatch: `"${version}"` }),
    onSettled: () => queryClient.invalidateQueries({ queryKey: ["members"] }),
  });
  const admin = canAdminister(myRole);
  const roles = assignableRoles(myRole);
  return (
    <section aria-labelledby="members-heading">
      <h2 id="members-heading">People</h2>
      {members.isPending && <Loading what="members" />}
      {members.error && <ErrorNotice error={members.error} title="Members could not be loaded" />}
      {change.error && <ErrorNotice error={change.error} title="The role was not changed" />}
      {remove.error && <ErrorNotice error={remove.error} title="The member was not removed" />}
      {members.data && (
        <TableWrap label="Members table">
          <table>
            <caption className="visually-hidden">Members of this organisation</caption>
            <thead>
              <tr>
                <th scope="col">Email</th>
                <th scope="col">Role</th>
                <th scope="col">Joined</th>
                {admin && <th scope="col">Actions</th>}
              </tr>
            </thead>
            <tbody>
              {members.data.items.map((member) => {
                const editable =
                  admin && member.userId !== myUserId && (member.role !== "owner" || canManageOwners(myRole));
                return (
                  <tr key={member.userId}>
                    <th scope="row">{member.email}</th>
                    <td>
                      {editable ? (
                        <select
                          aria-label={`Role of ${member.email}`}
                          value={member.role}
                          disabled={change.isPending}
                          onChange={(event) =>
                            change.mutate({
                              userId: member.userId,
                              role: event.target.value as Role,
                              version: member.version,
                            })
                          }
                        >
                          {roles.map((option) => (
                            <option key={option} value={option}>
                              {ROLE_LABEL[option]}
                            </option>
                          ))}
                        </select>
                      ) : (
                        ROLE_LABEL[member.role]
                      )}
                    </td>
                    <td>{member.joinedAt.toLocaleDateString()}</td>
                    {admin && (
                      <td>
                        {editable && (
                          <ConfirmButton
                            label={`Remove ${member.email}`}
                            text="Remove"
                            question={`Remove ${member.email} from this organisation? Their sessions and tokens here stop working at once.`}
                            confirmLabel="Remove member"
                            danger
                            disabled={remove.isPending}
                            onConfirm={() => remove.mutate({ userId: member.userId, version: member.version })}
                          />
                        )}
                      </td>
                    )}
                  </tr>
                );
              })}
            </tbody>
          </table>
        </TableWrap>
      )}
    </section>
  );
}

function Invitations({ myRole }: { myRole: Role | undefined }) {
  const queryClient = useQueryClient();
  const invitations = useQuery({
    queryKey: ["invitations"],
    queryFn: () => api.members.invitationList({ limit: 200 }),
  });
  const roles = assignableRoles(myRole);
  const [email, setEmail] = useState("");
  const [role, setRole] = useState<Role>("member");
  const [idempotencyKey, setIdempotencyKey] = useState(newIdempotencyKey);
  const [token, setToken] = useState<{ email: string; token: string } | null>(null);
  const invite = useMutation({
    mutationFn: () =>
      api.members.invitationCreate({ invitationRequest: { email: email.trim(), role }, idempotencyKey }),
    onSuccess: (created) => {
      setToken({ email: created.invitation.email, token: created.token });
      setEmail("");
      setIdempotencyKey(newIdempotencyKey());
      void queryClient.invalidateQueries({ queryKey: ["invitations"] });
    },
  });
  const revoke = useMutation({
    mutationFn: (invitationId: string) => api.members.invitationRevoke({ invitationId }),
    onSettled: () => queryClient.invalidateQueries({ queryKey: ["invitations"] }),
  });
  const problem = invite.error ? toApiError(invite.error) : null;
  const submit = (event: FormEvent) => {
    event.preventDefault();
    invite.mutate();
  };
  return (
    <section aria-labelledby="invitations-heading">
      <h2 id="invitations-heading">Invitations</h2>
      {token && (
        <SecretOnce
          label={`Invitation token for ${token.email}`}
          secret={token.token}
          onDone={() => setToken(null)}
        />
      )}
      <form className="form inline-form" onSubmit={submit}>
        <label>
          Email to invite
          <input
            type="email"
            name="invite-email"
            required
            maxLength={254}
            value={email}
            onChange={(event) => setEmail(event.target.value)}
          />
        </label>
        {problem?.fieldMessage("email") && <p className="field-error">{problem.fieldMessage("email")}</p>}
        <label htmlFor="invite-role">Role</label>
        <select id="invite-role" name="invite-role" value={role} onChange={(event) => setRole(event.target.value as Role)}>
            {roles.map((option) => (
              <option key={option} value={option}>
                {ROLE_LABEL[option]}
              </option>
            ))}
        </select>
        {invite.error && <ErrorNotice error={invite.error} title="The invitation was not created" />}
        <div className="actions">
          <button type="submit" className="button" disabled={invite.isPending}>
            {invite.isPending ? "Inviting…" : "Invite"}
          </button>
        </div>
      </form>
      <p className="hint">
        Keel sends no email: give the token to the person you invite. They sign in (or sign up) and accept it
        below; it is valid for 7 days.
      </p>
      {invitations.isPending && <Loading what="invitations" />}
      {invitations.error && <ErrorNotice error={invitations.error} title="Invitations could not be loaded" />}
      {revoke.error && <ErrorNotice error={revoke.error} title="The invitation was not revoked" />}
      {invitations.data && invitations.data.items.length === 0 && <p className="hint">No pending invitations.</p>}
      {invitations.data && invitations.data.items.length > 0 && (
        <TableWrap label="Invitations table">
          <table>
            <caption className="visually-hidden">Pending invitations</caption>
            <thead>
              <tr>
                <th scope="col">Email</th>
                <th scope="col">Role</th>
                <th scope="col">Expires</th>
                <th scope="col">Actions</th>
              </tr>
            </thead>
            <tbody>
              {invitations.data.items.map((invitation) => (
                <tr key={invitation.id}>
                  <th scope="row">{invitation.email}</th>
                  <td>{ROLE_LABEL[invitation.role]}</td>
                  <td>{invitation.expiresAt.toLocaleString()}</td>
                  <td>
                    <ConfirmButton
                      label={`Revoke the invitation of ${invitation.email}`}
                      text="Revoke"
                      question={`Revoke the invitation of ${invitation.email}? Its token stops working.`}
                      confirmLabel="Revoke invitation"
                      danger
                      disabled={revoke.isPending}
                      onConfirm={() => revoke.mutate(invitation.id)}
                    />
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </TableWrap>
      )}
    </section>
  );
}

function AcceptInvitation() {
  const queryClient = useQueryClient();
  const [token, setToken] = useState("");
  const accept = useMutation({
    mutationFn: () => api.members.invitationAccept({ invitationAcceptRequest: { token: token.trim() } }),
    onSuccess: () => {
      setToken("");
      // The new organisation appears in the switcher.
      void queryClient.invalidateQueries({ queryKey: ["session"] });
    },
  });
  const submit = (event: FormEvent) => {
    event.preventDefault();
    accept.mutate();
  };
  return (
    <section aria-labelledby="accept-heading">
      <h2 id="accept-heading">Join another organisation</h2>
      <form className="form inline-form" onSubmit={submit}>
        <label>
          Invitation token
          <input
            name="invitation-token"
            required
            autoComplete="off"
            maxLength={512}
            value={token}
            onChange={(event) => setToken(event.target.value)}
          />
        </label>
        {accept.error && <ErrorNotice error={accept.error} title="The invitation was not accepted" />}
        {accept.isSuccess && (
          <p className="notice" role="status">
            You joined. Switch to the organisation with the Organisation menu at the top.
          </p>
        )}
        <div className="actions">
          <button type="submit" className="button" disabled={accept.isPending}>
            {accept.isPending ? "Joining…" : "Accept invitation"}
          </button>
        </div>
      </form>
    </section>
  );
}
