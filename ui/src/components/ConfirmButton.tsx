import { useRef, type ReactNode } from "react";

/** A button that asks before it acts, in a modal dialog. */
export function ConfirmButton({
  label,
  question,
  confirmLabel,
  onConfirm,
  disabled,
  danger,
}: {
  label: string;
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
        onClick={() => dialog.current?.showModal()}
      >
        {label}
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
