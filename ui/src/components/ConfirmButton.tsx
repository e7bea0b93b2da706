import { useRef, type ReactNode } from "react";

/** A button that asks before it acts, in a modal dialog. */
export function ConfirmButton({
  label,
  text,
  question,
  confirmLabel,
  onConfirm,
  disabled,
  danger,
}: {
  /** The accessible name of the button and of its dialog. */
  label: string;
  /** What the button shows, when shorter than `label` (a row's "Revoke"). */
  text?: string;
  question: ReactNode;
  confirmLabel: string;
  onConfirm: () => void;
  disabled?: boolean;
  danger?: boolean;
}) {
  const dialog = useRef<HTMLDialogElement>(null);
  return (
    <>
      <button
        type="button"
        className={danger ? "button danger" : "button"}
        disabled={disabled}
        aria-label={text ? label : undefined}
        onClick={() => dialog.current?.showModal()}
      >
        {text ?? label}
      </button>
      <dialog ref={dialog} aria-label={label}>
        <form method="dialog">
          <p>{question}</p>
          <div className="actions">
            <button type="submit" value="cancel" className="button secondary">
              Cancel
            </button>
            <button
              type="submit"
              value="confirm"
              className={danger ? "button danger" : "button"}
              onClick={onConfirm}
            >
              {confirmLabel}
            </button>
          </div>
        </form>
      </dialog>
    </>
  );
}
