-- The SQL of an authenticated POST /v1/projects/{id}/allocations with an
-- Idempotency-Key, statement for statement: the idempotency layer, the
-- authorisation, the allocation and its placement, the audit and outbox
-- rows, the stored response, one transaction. (pgbench reads `:name` as a
-- variable even inside string literals, hence `chr(58)` for the colons of
-- resource names.)
\set key random(1, 2000000000)
\startpipeline
BEGIN;
SET LOCAL ROLE NONE;
SELECT set_config('keel.tenant_id', :tenant, true), set_config('keel.user_id', :user, true);
\endpipeline
SELECT pg_try_advisory_xact_lock(hashtextextended('idempotency|' || :tenant::text || '|user:' || :user::text || '|' || :key::text, 0));
SELECT request_hash, status_code, response_headers, response_body FROM idempotency_keys
 WHERE tenant_id = :tenant::uuid AND principal = 'user:' || :user::text AND key = :key::text;
SELECT gen_random_uuid()::text AS idem \gset
INSERT INTO idempotency_keys (tenant_id, principal, key, request_hash)
VALUES (:tenant::uuid, 'user:' || :user::text, :idem, sha256(convert_to(:idem, 'UTF8')));
SELECT role, grant_role, project_visible
  FROM caller_standing('user', :tenant::uuid, :user::uuid, :session::uuid, :project::uuid);
SELECT name, vcpus, memory_mib, gpu_model, gpu_count, disk_gib FROM flavors
 WHERE name = 'cpu.small' AND retired_at IS NULL;
SELECT EXISTS (SELECT FROM hosts WHERE region = r.name AND revoked_at IS NULL
                  AND vcpus >= 1 AND memory_mib >= 1024 AND gpu_count >= 0 AND disk_gib >= 10)
  FROM regions r WHERE r.name = 'local-1';
INSERT INTO allocations (id, tenant_id, project_id, name, flavor, region, command, state)
VALUES (gen_random_uuid(), :tenant::uuid, :project::uuid, 'bench', 'cpu.small', 'local-1', '{sleep,infinity}', 'requested')
RETURNING id AS alloc \gset
SELECT pg_advisory_xact_lock(hashtext('keel.quota'), hashtext(:tenant::text));
WITH held AS (
    SELECT a.project_id = :project::uuid AS in_project, f.vcpus, f.memory_mib, f.gpu_count
      FROM allocations a JOIN flavors f ON f.name = a.flavor
     WHERE a.tenant_id = :tenant::uuid AND a.reserved
), tenant_limits AS (
    SELECT allocations, vcpus, memory_mib, gpus FROM (
        SELECT allocations, vcpus, memory_mib, gpus, 0 AS rank
          FROM quotas WHERE tenant_id = :tenant::uuid AND project_id IS NULL
        UNION ALL
        SELECT allocations, vcpus, memory_mib, gpus, 1 FROM quota_defaults
    ) limits ORDER BY rank LIMIT 1
), used AS (
    SELECT count(*) AS allocations, COALESCE(sum(vcpus), 0)::bigint AS vcpus,
           COALESCE(sum(memory_mib), 0)::bigint AS memory_mib, COALESCE(sum(gpu_count), 0)::bigint AS gpus,
           count(*) FILTER (WHERE in_project) AS project_allocations,
           COALESCE(sum(vcpus) FILTER (WHERE in_project), 0)::bigint AS project_vcpus,
           COALESCE(sum(memory_mib) FILTER (WHERE in_project), 0)::bigint AS project_memory_mib,
           COALESCE(sum(gpu_count) FILTER (WHERE in_project), 0)::bigint AS project_gpus
      FROM held
)
SELECT t.allocations, t.vcpus, t.memory_mib::bigint, t.gpus,
       p.allocations, p.vcpus, p.memory_mib::bigint, p.gpus,
       u.allocations, u.vcpus, u.memory_mib, u.gpus,
       u.project_allocations, u.project_vcpus, u.project_memory_mib, u.project_gpus
  FROM tenant_limits t CROSS JOIN used u
  LEFT JOIN quotas p ON p.tenant_id = :tenant::uuid AND p.project_id = :project::uuid;
WITH candidate AS (
    SELECT id FROM hosts
     WHERE state = 'ready' AND revoked_at IS NULL AND region = 'local-1'
       AND vcpus - reserved_vcpus >= 1 AND memory_mib - reserved_memory_mib >= 1024
       AND gpu_count - reserved_gpus >= 0 AND (0 = 0 OR gpu_model = NULL)
       AND disk_gib - reserved_disk_gib >= 10
     ORDER BY vcpus - reserved_vcpus, memory_mib - reserved_memory_mib, id
     LIMIT 1 FOR UPDATE)
UPDATE hosts SET reserved_vcpus = reserved_vcpus + 1, reserved_memory_mib = reserved_memory_mib + 1024,
                 reserved_gpus = reserved_gpus + 0, reserved_disk_gib = reserved_disk_gib + 10
  FROM candidate WHERE hosts.id = candidate.id RETURNING hosts.id AS host \gset
UPDATE allocations SET state = 'scheduled', host_id = :host::uuid, reserved = true, updated_at = now(), version = version + 1
 WHERE id = :alloc::uuid
RETURNING id, tenant_id, project_id, name, flavor, region, command, state, failure_reason,
          host_id, reserved, created_at, updated_at, version;
WITH audit AS (
    INSERT INTO audit_log (id, tenant_id, actor, actor_detail, action, resource, request_id, outcome, details)
    SELECT id, tenant_id, actor, actor_detail, action, resource, 'bench', 'success', details
      FROM unnest(ARRAY[gen_random_uuid()], ARRAY[:tenant::uuid], ARRAY['user:' || :user::text],
                  ARRAY['{"type":"user"}'::jsonb], ARRAY['allocation.create'],
                  ARRAY[concat_ws(chr(58), 'krn', 'keel', 'local-1', :tenant::text, :project::text, 'allocation/' || :alloc::text)],
                  ARRAY['{"name":"bench","flavor":"cpu.small","state":"scheduled"}'::jsonb])
           AS a (id, tenant_id, actor, actor_detail, action, resource, details)
), events AS (
    INSERT INTO outbox (id, tenant_id, event_type, aggregate_type, aggregate_id, aggregate_version,
                        resource, payload, traceparent, request_id)
    SELECT id, tenant_id, event_type, aggregate_type, aggregate_id, aggregate_version, resource, payload, NULL, 'bench'
      FROM unnest(ARRAY[gen_random_uuid(), gen_random_uuid()], ARRAY[:tenant::uuid, :tenant::uuid],
                  ARRAY['allocation.requested', 'allocation.scheduled'], ARRAY['allocation', 'allocation'],
                  ARRAY[:alloc::uuid, :alloc::uuid], ARRAY[1, 2]::bigint[],
                  ARRAY[concat_ws(chr(58), 'krn', 'keel', 'local-1', :tenant::text, :project::text, 'allocation/' || :alloc::text),
                        concat_ws(chr(58), 'krn', 'keel', 'local-1', :tenant::text, :project::text, 'allocation/' || :alloc::text)],
                  ARRAY['{"allocation_id":"x","state":"requested"}'::jsonb, '{"allocation_id":"x","state":"scheduled"}'::jsonb])
           WITH ORDINALITY AS e (id, tenant_id, event_type, aggregate_type, aggregate_id, aggregate_version, resource, payload, n)
     ORDER BY n
)
SELECT pg_notify('keel_outbox', '');
UPDATE idempotency_keys SET status_code = 202, response_headers = '{"content-type":"application/json"}',
       response_body = convert_to(repeat('x', 400), 'UTF8')
 WHERE tenant_id = :tenant::uuid AND principal = 'user:' || :user::text AND key = :idem;
COMMIT;
