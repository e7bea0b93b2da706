-- A renewal whose answer was lost on the way to the node can be asked for
-- again: the certificate that asked may renew once more as long as the
-- certificate it was given has never been presented (the unused one is
-- then revoked). Certificates that exist already count as used.
ALTER TABLE node_certificates ADD COLUMN renewed_from text;
ALTER TABLE node_certificates ADD COLUMN first_used_at timestamptz;
UPDATE node_certificates SET first_used_at = issued_at;
